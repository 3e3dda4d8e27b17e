"""Publish each user's top-K next-item candidates of a fitted model as a Delta table for Feast.

Table `<lite.candidates_table>` (default user_candidates), one row per user, MERGEd by user_id:
    user_id, candidate_items (list<string>, best first), candidate_scores (list<float32>), model, run_id,
    encoder_id, weights_hash, item_layer, event_timestamp (UTC, when the candidates were computed)
A user's candidates are scored from their newest `lite.max_seq` events over all splits (the model's input
window); every item in the user's whole history is excluded, not only those in the window. Feast serves it
as `user_candidates_fv` (feature_repo/candidate_views.py). The table passes
`llmfeat.validation.suites.candidates_suite` before each commit, and the training run links that gate's Data
Docs.
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
    from llmfeat.config import Settings
    from llmfeat.models.lite_llm4rec.data import LiteData
    from llmfeat.models.lite_llm4rec.model import NextItemModel
    from llmfeat.validation.gating import GateReport


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


def publish_candidates(
    settings: Settings, data: LiteData, model: NextItemModel, run_id: str
) -> tuple[str, GateReport]:
    """Gate, then MERGE the top-`lite.publish_k` candidates into the Delta table; returns a one-line report
    and the gate's report (for the training run's Data Docs link)."""
    from llmfeat.delta_io import RustDelta
    from llmfeat.validation.gating import gate, new_run_id
    from llmfeat.validation.suites import candidates_suite

    cfg = settings.lite
    table = candidates_table(data, model, cfg.publish_k, run_id)
    tables = RustDelta(settings.delta_root)
    suite = candidates_suite(cfg.candidates_table, cfg.publish_k, settings.validation)
    checked = gate(
        table, suite, table=cfg.candidates_table, tables=tables, run_id=new_run_id("train-lite"),
        conf=settings.validation,
    )  # fmt: skip
    version = tables.upsert(cfg.candidates_table, table, ["user_id"])
    line = (
        f"published top-{cfg.publish_k} candidates of {table.num_rows:,} users to "
        f"{tables.path(cfg.candidates_table)} (version {version})"
    )
    return line, checked
