"""The batch contract between the data service and the trainer.

A batch is a dict of torch tensors (B cells, T tokens, T = longest cell in the batch, CLS included):

    gene_ids         int64  [B, T]  input token ids; masked positions hold MASK_ID; padding holds PAD_ID
    values           float32 [B, T] input expression values (rank tokenizer: 0; binned: bin index); masked → 0
    seq_lens         int32  [B]     valid tokens per cell (CLS included); positions ≥ seq_lens are padding
    soma_joinid      int64  [B]     which cells these are (exactly-once checks)
    mask             bool   [B, T]  positions the objective predicts (never CLS, never padding)
    target_gene_ids  int64  [B, T]  true gene id at every position (PAD_ID at padding)
    target_values    float32 [B, T] true expression value at every position (0 at padding)

Token ids: PAD_ID, CLS_ID, MASK_ID come first; gene g of the atlas vocabulary has id N_SPECIAL + g.
"""

from __future__ import annotations

PAD_ID = 0
CLS_ID = 1
MASK_ID = 2
N_SPECIAL = 3

GENE_IDS = "gene_ids"
VALUES = "values"
SEQ_LENS = "seq_lens"
SOMA_JOINID = "soma_joinid"
MASK = "mask"
TARGET_GENE_IDS = "target_gene_ids"
TARGET_VALUES = "target_values"

BATCH_KEYS = (GENE_IDS, VALUES, SEQ_LENS, SOMA_JOINID, MASK, TARGET_GENE_IDS, TARGET_VALUES)
