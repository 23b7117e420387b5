"""Looking inside trained models and comparing them: expert utilisation, plots, HTML report."""

from mtlrec.analysis.utilisation import gate_load, gate_utilisation, load_imbalance, utilisation_table

__all__ = ["gate_load", "gate_utilisation", "load_imbalance", "utilisation_table"]
