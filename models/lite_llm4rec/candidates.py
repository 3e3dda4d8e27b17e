"""Each user's top-K next-item candidates of a fitted model, as the table Feast serves (user_candidates_fv).

One row per user: user_id, candidate_items (list<string>, best first), candidate_scores (list<float32>),
model, run_id, encoder_id, weights_hash, item_layer, event_timestamp (UTC, when the candidates were
computed). A user's candidates are scored from their newest `max_seq` events over all splits (the model's
input window); every item in the user's whole history is excluded, not only those in the window.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from llmfeat.models.evaluation.rank_metrics import ItemSets
from llmfeat.models.lite_llm4rec.data import user_histories

if TYPE_CHECKING:
    from llmfeat.models.lite_llm4rec.data import LiteData
    from llmfeat.models.lite_llm4rec.model import NextItemModel


@torch.no_grad()
def top_candidates(
    model: NextItemModel, histories: np.ndarray, seen: ItemSets, k: int, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """histories (U, S) input windows, seen (U sets) each user's whole history -> item indices (U, k) and
    scores (U, k), every seen item and padding excluded."""
    model.eval()
    idx, val = [], []
    for s in range(0, len(histories), batch):
        e = min(s + batch, len(histories))
        h = torch.from_numpy(histories[s:e])  # (B, S)
        scores = model.next_item_scores(h).float()  # (B, I + 1)
        scores[:, 0] = float("-inf")  # padding
        scores.masked_fill_(seen.mask(s, e, scores.shape[1]), float("-inf"))  # the whole history
        top = scores.topk(k, dim=1)
        idx.append(top.indices.numpy())
        val.append(top.values.numpy())
    return np.concatenate(idx), np.concatenate(val)


def candidates_table(
    data: LiteData, model: NextItemModel, k: int, run_id: str, computed_at: datetime | None = None
) -> pa.Table:
    users, histories, seen = user_histories(data.log, model.cfg.max_seq)
    items, scores = top_candidates(model, histories, seen, k)
    keys = data.log.item_keys
    n = len(users)
    at = computed_at or datetime.now(UTC)
    lineage = data.lineage

    def const(value: object, kind: pa.DataType) -> pa.Array:
        return pa.array([value] * n, kind)

    return pa.table(
        {
            "user_id": pa.array(data.log.user_keys[users].tolist(), pa.string()),
            "candidate_items": pa.array(
                [[str(keys[i - 1]) for i in row] for row in items], pa.list_(pa.string())
            ),
            "candidate_scores": pa.array(scores.astype(np.float32).tolist(), pa.list_(pa.float32())),
            "model": const("lite_llm4rec", pa.string()),
            "run_id": const(run_id, pa.string()),
            "encoder_id": const(str(lineage.get("encoder_id", "")), pa.string()),
            "weights_hash": const(str(lineage.get("weights_hash", "")), pa.string()),
            "item_layer": const(int(lineage.get("layer", -1)), pa.int64()),
            "event_timestamp": const(at, pa.timestamp("us", tz="UTC")),
        }
    )
