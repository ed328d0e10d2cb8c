"""Counts as data: plain (nested) dicts that steps emit and the job adds up to reconcile.

Beam's metrics are a view for monitoring; what a job checks before it publishes travels as data.
"""


def add_counts(dicts) -> dict:
    """Sum of count dicts; nested dicts (by reason, by signature) add up key by key."""
    total: dict = {}
    for counts in dicts:
        for name, value in counts.items():
            if isinstance(value, dict):
                inner = total.setdefault(name, {})
                for key, amount in value.items():
                    inner[key] = inner.get(key, 0) + amount
            else:
                total[name] = total.get(name, 0) + value
    return total
