"""Looking inside trained models and comparing them: expert utilisation, plots, HTML report."""

from mtlrec.analysis.utilisation import gate_utilisation, utilisation_table

__all__ = ["gate_utilisation", "utilisation_table"]
