"""Job names that Kubernetes, Helm and KubeRay all accept."""

from __future__ import annotations

import re

# KubeRay names the RayCluster "<rayjob>-<5 chars>" and keeps it under 53 characters, so a RayJob name is at most
# 47; it must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter).
MAX_JOB_NAME = 47


def job_name(name: str) -> str:
    """`name` as a DNS-1035 label of at most 47 characters: 'H200 160M@8K' -> 'h200-160m-8k'."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    out = re.sub(r"-{2,}", "-", out)
    if not out or not out[0].isalpha():
        out = f"scfm-{out}".rstrip("-")
    return out[:MAX_JOB_NAME].rstrip("-")
