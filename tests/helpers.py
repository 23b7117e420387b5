"""Small builders shared by the tests."""

from mtlrec.schema import Schema


def dense_schema(n_dense: int = 6, tasks=("a", "b"), types=None) -> Schema:
    types = types or ["binary"] * len(tasks)
    return Schema(
        dense=[{"name": f"x{i}"} for i in range(n_dense)],
        tasks=[{"name": t, "type": k} for t, k in zip(tasks, types)],
    )
