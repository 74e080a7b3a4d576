"""Evaluation: cell embeddings of a checkpoint, separation/cohesion scores, plots, and run comparison.

    metrics.py   score_embeddings(X [N, D], labels [N]) -> {score: value} (scanpy, scikit-learn)
    plots.py     UMAP coloured by label; loss / grad-norm curve overlays (matplotlib, Agg)
    embed.py     embed_cells(model, batches) -> (soma_joinid [N], X [N, D]); zarr and h5ad writers
    runs.py      MLflow tracking URI, run histories, logging scores to a run
    compare.py   the `launch compare` table and figure
    evaluate.py  the `launch eval` pipeline: embeddings -> files, scores, UMAP, MLflow; in-training scores
    config.py    EvalConfig: evaluation every N steps during training

Importing this package imports nothing heavy; each module imports scanpy/mlflow/torch inside its functions.
"""
