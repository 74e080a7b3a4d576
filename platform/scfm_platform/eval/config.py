"""`EvalConfig`: evaluation during training, meant as the `eval` section of a run config (RunConfig.eval).

Every `every` optimizer steps, rank 0 embeds a held-out labelled set with the bare model, scores it with
`scfm_platform.eval.evaluate.training_scores`, and logs the scores to MLflow as eval/<score> at that step.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between in-training evaluations (0: never)
    atlas: str | None = None  # labelled SOMA atlas to embed (None: the validation split of data.atlas)
    label: str = "cell_type"  # obs column holding the cell-type labels
    datasets: list[str] = field(default_factory=list)  # score all cells of these datasets (obs dataset_id) instead
    max_cells: int = 2000  # cells scored per evaluation (seeded subset), so one evaluation takes seconds
