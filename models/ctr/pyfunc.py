"""The registered form of a CTR ranker: an MLflow pyfunc holding the weights, the config and the fitted
feature encoder, so that `models:/<name>@champion` scores a scoring frame (models/ctr/features.py) by itself.

    ranker = load_ranker("models:/llmfeat-ctr@champion")   # CtrRanker (DNN) or TreeRanker (LightGBM)
    p = ranker.score(frame)                                 # (B,) click probabilities
    p = ranker.score_arrays(columns)                        # the same from the frame's columns as arrays

Self-contained: the model carries its code (code_paths: the whole ctr and evaluation packages and every
llmfeat module they import, in the installed layout) and asks for mlflow, torch, numpy and pandas only (and
lightgbm for the tree family: the encoder that both share builds torch tensors), so
`mlflow.pyfunc.load_model` and `mlflow models serve` work where llmfeat is not installed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from llmfeat.models.ctr.features import (
    COUNTERS,
    FRESH_VECTORS,
    VECTOR_COLUMNS,
    FeatureEncoder,
    fresh_dense,
    join_side,
)
from llmfeat.models.ctr.model import CtrConfig, CtrInputs, CtrModel
from llmfeat.models.ctr.tree import tree_feature_names, tree_matrix
from llmfeat.models.evaluation.ab_stats import unit_hash

ARTIFACTS = ("weights", "config", "encoder")
# The code a registered ranker carries: these packages whole (new modules there travel without a change here)
# and every llmfeat module they import.
CODE_PACKAGES = ("llmfeat.models.ctr", "llmfeat.models.evaluation")


class CtrRanker(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined,misc]
    """pyfunc wrapper: scoring frame -> click probabilities. The DNN family (dnn, deepfm); `TreeRanker` is
    the LightGBM one. Both score what the same encoder makes of a frame or of its arrays."""

    family = "dnn"

    def __init__(self) -> None:
        self.model: CtrModel | None = None
        self.encoder: FeatureEncoder | None = None
        self._arrays: ArrayEncoder | None = None

    def load_context(self, context: Any) -> None:
        cfg = json.loads(Path(context.artifacts["config"]).read_text())
        cfg["hidden"] = tuple(cfg["hidden"])
        self.attach(
            CtrModel(CtrConfig(**cfg)),
            FeatureEncoder.load(Path(context.artifacts["encoder"])),
            torch.load(context.artifacts["weights"], weights_only=True),
        )

    def attach(self, model: CtrModel, encoder: FeatureEncoder, state: dict[str, Any] | None = None) -> None:
        if state is not None:
            model.load_state_dict(state)
        self.model, self.encoder = model.eval(), encoder

    def probabilities(self, x: CtrInputs) -> np.ndarray:
        """Encoded inputs (B rows) -> (B,) click probabilities."""
        assert self.model is not None, "load_context was not called"
        with torch.no_grad():
            return torch.sigmoid(self.model(x)).numpy().astype(np.float64)

    def write_artifacts(self, folder: Path) -> dict[str, str]:
        assert self.model is not None and self.encoder is not None
        return write_artifacts(self.model, self.encoder, folder)

    def pip_requirements(self) -> list[str]:
        return pip_requirements()

    @property
    def columns(self) -> list[str]:
        """Scoring-frame columns this model reads."""
        assert self.encoder is not None
        extra = [c for c in (*VECTOR_COLUMNS, *FRESH_VECTORS) if c in self.encoder.vec_mean]
        fresh = [c for c in self.encoder.fresh_columns if c not in extra]
        return ["user_id", "item_id", "year", "genres", *COUNTERS, *extra, *fresh]

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        assert self.encoder is not None, "load_context was not called"
        return self.probabilities(self.encoder.transform(frame))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        return self.score(model_input)

    def score_arrays(self, columns: Mapping[str, Any]) -> np.ndarray:
        """`score` without pandas, for a ranking service (about 10x less work per request than building and
        transforming a frame): the scoring frame's columns as arrays of B rows, ids as str sequences, numbers
        as float arrays (NaN = null), genres as str-or-None, a vector column as (B, D) float32 (NaN rows =
        missing); absent counters count as 0, as in `score`. -> (B,) click probabilities."""
        assert self.encoder is not None, "load_context was not called"
        arrays = getattr(self, "_arrays", None)  # absent on rankers pickled before this method existed
        if arrays is None or arrays.encoder is not self.encoder:
            arrays = self._arrays = ArrayEncoder(self.encoder)
        return self.probabilities(arrays.transform(columns))


class TreeRanker(CtrRanker):
    """The LightGBM family: the booster (LightGBM's text format), its feature names and the encoder."""

    family = "lightgbm"

    def __init__(self) -> None:
        super().__init__()
        self.booster: Any = None

    def load_context(self, context: Any) -> None:
        import lightgbm

        names = json.loads(Path(context.artifacts["features"]).read_text())
        booster = lightgbm.Booster(model_file=context.artifacts["booster"])
        self.attach_tree(booster, FeatureEncoder.load(Path(context.artifacts["encoder"])), names)

    def attach_tree(self, booster: Any, encoder: FeatureEncoder, names: list[str] | None = None) -> None:
        expected = tree_feature_names(encoder)  # the layout is the model's contract with its inputs
        for got in (booster.feature_name(), names):
            if got is not None and got != expected:
                odd = sorted(set(got) ^ set(expected))[:5] or "the same names in another order"
                raise ValueError(f"the booster's features differ from what its encoder makes: {odd}")
        self.booster, self.encoder = booster, encoder

    def probabilities(self, x: CtrInputs) -> np.ndarray:
        assert self.booster is not None, "load_context was not called"
        # one thread: a ranking service runs a worker per core, and 100 rows do not pay for more
        p = self.booster.predict(tree_matrix(x), num_iteration=self.booster.best_iteration, num_threads=1)
        return np.asarray(p, dtype=np.float64)

    def write_artifacts(self, folder: Path) -> dict[str, str]:
        assert self.booster is not None and self.encoder is not None
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"booster": folder / "booster.txt", "features": folder / "features.json",
                 "encoder": folder / "encoder.json"}  # fmt: skip
        self.booster.save_model(str(paths["booster"]), num_iteration=self.booster.best_iteration)
        paths["features"].write_text(json.dumps(self.booster.feature_name()))
        self.encoder.save(paths["encoder"])
        return {k: str(v) for k, v in paths.items()}

    def pip_requirements(self) -> list[str]:
        return [*pip_requirements(), f"lightgbm=={version('lightgbm')}"]


class NoInfoRanker(CtrRanker):
    """A ranker that knows nothing: every item gets a fixed score from a stable hash of its id, whoever the
    user is. An online comparison's known loser (spark_jobs/abtest_replay.py): any ranker that learned
    something beats it."""

    family = "none"

    def load_context(self, context: Any) -> None:
        pass

    @property
    def columns(self) -> list[str]:
        return ["user_id", "item_id"]

    def write_artifacts(self, folder: Path) -> dict[str, str]:
        return {}

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        return self.score_arrays({"item_id": frame["item_id"].astype(str).tolist()})

    def score_arrays(self, columns: Mapping[str, Any]) -> np.ndarray:
        return np.array([unit_hash(f"no-information:{i}") for i in columns["item_id"]], dtype=np.float64)


class ArrayEncoder:
    """`FeatureEncoder.transform` on columns as arrays, with its lookups built once (see score_arrays)."""

    def __init__(self, encoder: FeatureEncoder):
        self.encoder = encoder
        self.users = {k: i + 1 for i, k in enumerate(encoder.user_ids)}
        self.items = {k: i + 1 for i, k in enumerate(encoder.item_ids)}
        self.genre_index = {g: i for i, g in enumerate(encoder.genres)}
        self.genre_codes: dict[str, int] = {}  # "A|B" -> its row of genre_table; row 0: no genre
        self.genre_table = np.zeros((1, len(encoder.genres)), dtype=np.float32)  # (rows, G) multi-hot
        self.moments = {
            c: (np.asarray(encoder.vec_mean[c], np.float32), np.asarray(encoder.vec_std[c], np.float32))
            for c in encoder.vec_mean
        }

    def transform(self, columns: Mapping[str, Any]) -> CtrInputs:
        enc = self.encoder
        b = len(columns["item_id"])
        year = np.asarray(columns["year"], dtype=np.float64)  # (B,)
        year_missing = np.isnan(year)
        dense = [np.where(year_missing, 0.0, (year - enc.year_mean) / enc.year_std), year_missing]
        for who in ("item", "user"):
            n, c = (self._counter(columns, f"{who}_{k}", b) for k in ("impressions", "clicks"))
            dense += [np.log1p(n), (c + enc.prior * enc.base_ctr) / (n + enc.prior)]
        dense.append(dense[4] > 0)  # the user has history on an earlier day
        if enc.fresh:
            dense += fresh_dense(
                lambda c: np.asarray(columns[c], dtype=np.float64) if c in columns else np.full(b, np.nan),
                lambda c: np.asarray(columns[c], dtype=np.float32),
                enc.fresh,
                enc.base_ctr,
                enc.prior,
            )
        vectors, missing = [], []
        for side in (enc.user_columns, ["item_vector"] if "item_vector" in self.moments else []):
            absent = np.ones(b, dtype=bool)
            parts = []
            for col in side:
                raw = np.asarray(columns[col], dtype=np.float32)  # (B, D)
                gone = np.isnan(raw[:, 0])
                mean, std = self.moments[col]
                z = (raw - mean) / std
                z[gone] = 0.0
                parts.append(z)
                absent &= gone
            vectors.append(join_side(parts, b))
            missing.append(absent.astype(np.float32))
        return CtrInputs(
            user=torch.tensor([self.users.get(u, 0) for u in columns["user_id"]], dtype=torch.int64),
            item=torch.tensor([self.items.get(i, 0) for i in columns["item_id"]], dtype=torch.int64),
            genres=torch.from_numpy(self._genres(columns["genres"], b)),  # (B, G)
            dense=torch.from_numpy(np.stack(dense, axis=1).astype(np.float32)),  # (B, F)
            user_vec=torch.from_numpy(vectors[0]),
            item_vec=torch.from_numpy(vectors[1]),
            vec_missing=torch.from_numpy(np.stack(missing, axis=1)),  # (B, 2)
        )

    @staticmethod
    def _counter(columns: Mapping[str, Any], name: str, b: int) -> np.ndarray:
        if name not in columns:
            return np.zeros(b)
        return np.nan_to_num(np.asarray(columns[name], dtype=np.float64), nan=0.0)

    def _genres(self, values: Any, b: int) -> np.ndarray:
        if len(self.genre_codes) >= 10_000:  # bounded memory: start over (never within one request)
            self.genre_codes.clear()
            self.genre_table = self.genre_table[:1]
        codes = self.genre_codes
        rows = [codes.get(v) or self._genre_code(v) if isinstance(v, str) else 0 for v in values]
        return self.genre_table[rows].reshape(b, -1)  # (B, G)

    def _genre_code(self, value: str) -> int:
        hot = np.zeros((1, self.genre_table.shape[1]), dtype=np.float32)
        hot[0, [self.genre_index[g] for g in value.split("|") if g in self.genre_index]] = 1.0
        self.genre_table = np.concatenate([self.genre_table, hot])
        self.genre_codes[value] = len(self.genre_table) - 1
        return self.genre_codes[value]


def write_artifacts(model: CtrModel, encoder: FeatureEncoder, folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        name: folder / f"{name}{ext}" for name, ext in zip(ARTIFACTS, (".pt", ".json", ".json"), strict=True)
    }
    torch.save(model.state_dict(), paths["weights"])
    paths["config"].write_text(json.dumps(asdict(model.cfg)))
    encoder.save(paths["encoder"])
    return {k: str(v) for k, v in paths.items()}


def pip_requirements() -> list[str]:
    """What a serving environment installs: the versions logging ran with (local build tags dropped)."""
    pinned = [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", "torch")]
    return [*pinned, "numpy", "pandas"]


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    return Path(spec.origin)


def _imported_modules(path: Path, module: str) -> set[str]:
    """llmfeat modules `path` imports at run time (imports under `if TYPE_CHECKING:` do not run)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for part in node.body
        for n in ast.walk(part)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            found |= {base, *(f"{base}.{a.name}" for a in node.names)}  # `from pkg import module` too
    return {m for m in found if m.split(".")[0] == "llmfeat" and _is_module(m)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def code_tree(folder: Path, packages: tuple[str, ...] = CODE_PACKAGES) -> Path:
    """Copy `packages` and every llmfeat module they import (transitively, with the __init__ files of their
    packages) into folder/llmfeat, in the installed layout; returns folder/llmfeat for code_paths."""
    todo = [
        f"{pkg}.{p.stem}" if p.name != "__init__.py" else pkg
        for pkg in packages
        for p in sorted(_source(pkg).parent.glob("*.py"))
    ]
    done: set[str] = set()
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages above it
        src = _source(module)
        todo += sorted(_imported_modules(src, module) - done)
        dest = folder.joinpath(*(parts if src.name == "__init__.py" else parts[:-1]), src.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return folder / "llmfeat"


def log_ranker(ranker: CtrRanker, example: pd.DataFrame, registered_name: str | None) -> Any:
    """Inside an active run: log the pyfunc (either family) with signature (inferred from the example and its
    scores), the input example and explicit pip requirements; register it when a name is given."""
    from mlflow.models import infer_signature

    # a service without counters (or content) leaves those inputs null, exactly as they are served
    example = example.reindex(columns=ranker.columns).reset_index(drop=True)
    for col in (*VECTOR_COLUMNS, *FRESH_VECTORS):  # JSON carries float64: the signature says Array(double)
        if col in example.columns:
            example[col] = example[col].map(lambda v: [float(x) for x in v])
    signature = infer_signature(example, ranker.score(example))
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name="ctr_model",
            python_model=type(ranker)(),
            artifacts=ranker.write_artifacts(Path(tmp) / "artifacts"),
            code_paths=[str(code_tree(Path(tmp) / "code"))],
            signature=signature,
            input_example=example,
            pip_requirements=ranker.pip_requirements(),
            registered_model_name=registered_name,
        )


def dnn_ranker(model: CtrModel, encoder: FeatureEncoder) -> CtrRanker:
    ranker = CtrRanker()
    ranker.attach(model, encoder)
    return ranker


def tree_ranker(booster: Any, encoder: FeatureEncoder) -> TreeRanker:
    ranker = TreeRanker()
    ranker.attach_tree(booster, encoder)
    return ranker


def load_ranker(uri: str) -> CtrRanker:
    """The CtrRanker behind a models:/ or runs:/ URI (no schema enforcement: callers pass scoring frames)."""
    ranker = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(ranker, CtrRanker):
        raise TypeError(f"{uri} is not a CTR ranker (got {type(ranker).__name__})")
    return ranker
