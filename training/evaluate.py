"""Full-catalog retrieval metrics: Recall@k and NDCG@k, the member's history excluded."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from feedserve.artifacts import ADAPTER_META, EncoderSettings
from feedserve.files import atomic_file, hash_file
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.records import Member, Post
from feedserve.training.data import EvalCase

logger = logging.getLogger(__name__)

EmbedPosts = Callable[[Sequence[Post]], np.ndarray]
EmbedMembers = Callable[[Sequence[Member]], np.ndarray]


def rank(scores: np.ndarray, ids: np.ndarray, cases: Sequence[EvalCase], k: int) -> list[np.ndarray]:
    """Top-k post ids per case, skipping the posts it has seen (`EvalCase.seen`)."""
    out = []
    for row, case in zip(scores, cases, strict=True):
        seen = case.seen()
        order = np.argsort(-row, kind="stable")
        out.append(np.array([i for i in ids[order[: k + len(seen)]] if i not in seen][:k], np.int64))
    return out


def per_case(
    top: Sequence[np.ndarray], cases: Sequence[EvalCase], ks: Sequence[int] = (10, 50, 100)
) -> dict[str, np.ndarray]:
    """Recall@k for each k and NDCG@10, one value per case (what `metrics` averages, and what a
    paired comparison of two rankings of the same cases resamples)."""
    result: dict[str, np.ndarray] = {}
    for k in ks:
        result[f"recall@{k}"] = np.array(
            [len(set(t[:k].tolist()) & c.targets) / len(c.targets) for t, c in zip(top, cases, strict=True)]
        )
    ndcg = []
    for t, c in zip(top, cases, strict=True):
        gains = [1.0 / np.log2(i + 2) for i, pid in enumerate(t[:10]) if pid in c.targets]
        ideal = sum(1.0 / np.log2(i + 2) for i in range(min(10, len(c.targets))))
        ndcg.append(sum(gains) / ideal)
    result["ndcg@10"] = np.array(ndcg)
    return result


def metrics(
    top: Sequence[np.ndarray], cases: Sequence[EvalCase], ks: Sequence[int] = (10, 50, 100)
) -> dict[str, float]:
    return {name: float(np.mean(values)) for name, values in per_case(top, cases, ks).items()}


def paired_ratio(
    base: np.ndarray, other: np.ndarray, groups: Sequence[int], samples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """mean(other) / mean(base) over paired per-case values, with a 95% interval from a bootstrap
    that resamples whole groups (a member's cases are correlated: resampling cases alone would
    understate the spread), and how often the resampled ratio is above 1.

    Over a zero base the ratio is undefined, not 0x or a huge number: nan where both are zero, inf
    where only the base is. A slice with few hits, such as new posts, has resamples like that: where
    some lose the base's hits the interval is unbounded above, and where some have no hit in either
    order it is nan (too few members carry the slice for a bootstrap to say anything)."""
    keys, group = np.unique(np.asarray(groups), return_inverse=True)
    base_sum = np.bincount(group, weights=base, minlength=len(keys))
    other_sum = np.bincount(group, weights=other, minlength=len(keys))
    picks = np.random.default_rng(seed).integers(0, len(keys), size=(samples, len(keys)))
    ratios = _ratio(other_sum[picks].sum(1), base_sum[picks].sum(1))
    low, high = np.nan, np.nan
    if not np.isnan(ratios).any():
        # Interpolating between two infinite resamples gives nan: that end of the interval is inf.
        with np.errstate(invalid="ignore"):
            low, high = np.nan_to_num(np.percentile(ratios, [2.5, 97.5]), nan=np.inf, posinf=np.inf)
    return {
        "ratio": float(_ratio(np.asarray(other.sum()), np.asarray(base.sum()))),
        "low": float(low),
        "high": float(high),
        "above_1": float(np.mean(ratios > 1)),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(num, np.float64) / np.asarray(den, np.float64)


def evaluate_embeddings(
    embed_posts: EmbedPosts,
    embed_members: EmbedMembers,
    corpus: Sequence[Post],
    cases: Sequence[EvalCase],
    ks: Sequence[int] = (10, 50, 100),
    batch: int = 32,
) -> dict[str, float]:
    post_vecs = np.concatenate([embed_posts(corpus[i : i + batch]) for i in range(0, len(corpus), batch)])
    members = [c.member for c in cases]
    member_vecs = np.concatenate([embed_members(members[i : i + batch]) for i in range(0, len(members), batch)])
    ids = np.array([p.id for p in corpus], np.int64)
    top = rank(member_vecs @ post_vecs.T, ids, cases, max(ks))
    return metrics(top, cases, ks)


def popularity_correlation(scores: np.ndarray, popularity: np.ndarray) -> float:
    """Pearson correlation, over posts, between log popularity and the mean similarity members give
    the post. The system we reproduce reports that percentile tokens make the model see popularity
    (raw numbers in text barely register); this is the number that shows it."""
    pop = np.log1p(np.asarray(popularity, np.float64))
    mean_score = np.asarray(scores, np.float64).mean(axis=0)
    if pop.std() == 0 or mean_score.std() == 0:
        return 0.0
    return float(np.corrcoef(pop, mean_score)[0, 1])


class EmbeddingRetriever:
    """A dual-encoder checkpoint scored in-process with PyTorch: the same prompts, budgets and
    weights the server uses, without the server (the benchmark ranks the whole catalog).

    Post embeddings are computed once per (weights, settings, buckets, corpus) and cached as .npz:
    embedding 9,742 movies is minutes on 2 cores, ranking them is milliseconds.
    """

    def __init__(
        self,
        hf_dir: Path,
        settings: EncoderSettings,
        buckets: PercentileBuckets,
        corpus: Sequence[Post],
        cache_dir: Path | None = None,
        batch: int = 32,
        device: str = "cpu",
        onnx: Path | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        from feedserve.encode.base import Encoder
        from feedserve.encode.ort import OnnxEncoder
        from feedserve.encode.pytorch import TorchEncoder
        from feedserve.prompt.builder import PromptBuilder

        self.settings, self.batch = settings, batch
        # An exported graph (e.g. the int8 one) scores what the server would serve; it embeds at the
        # width it was exported with (the artifacts' `dim`).
        self.encoder: Encoder = (
            OnnxEncoder(onnx) if onnx is not None else TorchEncoder(hf_dir, replace(settings, dim=None), device=device)
        )  # full width; `score` truncates
        self.builder = PromptBuilder(Tokenizer.from_file(str(hf_dir / "tokenizer.json")), buckets, settings)
        key = self._cache_key(hf_dir, settings, buckets, corpus, onnx)
        # bf16 vectors from a GPU are not the fp32 CPU ones: the device is part of the name.
        device_tag = "" if device == "cpu" else "-" + device.replace(":", "")
        path = cache_dir / f"posts-{key[:16]}{device_tag}.npz" if cache_dir else None
        self._members_path = cache_dir / f"members-{key[:16]}{device_tag}.npz" if cache_dir else None
        self._members = self._saved_members()  # by the sha256 of the member's prompt
        self._unsaved = False  # embedded since the last save
        if path is not None and path.exists():
            self.posts = np.load(path, allow_pickle=False)["embeddings"]
            logger.info("post embeddings from cache %s", path)
        else:
            t = time.perf_counter()
            self.posts = self._embed(self.builder.post_prompt, corpus)
            logger.info("embedded %d posts in %.0f s", len(corpus), time.perf_counter() - t)
            if path is not None:
                with atomic_file(path) as f:  # a killed run never leaves a truncated cache
                    np.savez(f, embeddings=self.posts)

    @staticmethod
    def _cache_key(
        hf_dir: Path,
        settings: EncoderSettings,
        buckets: PercentileBuckets,
        corpus: Sequence[Post],
        onnx: Path | None = None,
    ) -> str:
        h = hashlib.sha256()
        for weights in sorted(hf_dir.glob("*.safetensors")) + ([onnx] if onnx is not None else []):
            hash_file(h, weights)
        h.update(json.dumps(asdict(settings), sort_keys=True).encode())
        h.update(buckets.to_json().encode())
        h.update(json.dumps([p.model_dump(mode="json") for p in corpus], sort_keys=True).encode())
        return h.hexdigest()

    def _embed(self, prompt: Callable[[Any], str], records: Sequence[Any]) -> np.ndarray:
        texts = [prompt(r) for r in records]
        lengths = [len(e.ids) for e in self.builder.tokenizer.encode_batch(texts)]
        order = np.argsort(lengths, kind="stable")  # similar lengths batch together: less padding
        out = np.zeros((len(texts), 0), np.float32)
        for start in range(0, len(texts), self.batch):
            rows = order[start : start + self.batch]
            tokens = self.builder.tokenize([texts[i] for i in rows])
            vecs = self.encoder.encode(tokens.input_ids, tokens.attention_mask)
            if out.shape[1] == 0:
                out = np.zeros((len(texts), vecs.shape[1]), np.float32)
            out[rows] = vecs
        return out

    def member_vectors(self, members: Sequence[Member]) -> np.ndarray:
        # Memoised by prompt: the benchmark scores the same members for every slice and dimension,
        # and the ranker's training embeds the same members at the same moments in every run.
        prompts = [self.builder.member_prompt(m) for m in members]
        keys = [hashlib.sha256(p.encode()).hexdigest() for p in prompts]
        todo = sorted({(k, p) for k, p in zip(keys, prompts, strict=True) if k not in self._members})
        if todo:
            for (key, _), vec in zip(todo, self._embed(str, [p for _, p in todo]), strict=True):
                self._members[key] = vec
            self._unsaved = True
        return np.stack([self._members[k] for k in keys])

    def save_members(self) -> None:
        """Keep the member embeddings computed so far in the cache directory, for the next run, with
        those another run saved there meanwhile (runs side by side share one cache)."""
        if self._members_path is None or not self._unsaved:
            return  # nothing new: a validation curve saves at every point
        self._members = {**self._saved_members(), **self._members}
        with atomic_file(self._members_path) as f:
            np.savez(f, prompts=np.array(list(self._members)), vectors=np.stack(list(self._members.values())))
        self._unsaved = False

    def _saved_members(self) -> dict[str, np.ndarray]:
        if self._members_path is None or not self._members_path.exists():
            return {}
        with np.load(self._members_path, allow_pickle=False) as saved:
            return dict(zip(saved["prompts"].tolist(), saved["vectors"], strict=True))

    def score(self, members: Sequence[Member], dim: int | None = None) -> np.ndarray:
        """Cosine scores [members, posts]; `dim` takes a renormalised Matryoshka prefix (default:
        the dimension the settings serve)."""
        dim = dim if dim is not None else self.settings.dim
        m, p = self.member_vectors(members), self.posts
        if dim is not None:
            m, p = _unit(m[:, :dim]), _unit(p[:, :dim])
        return m @ p.T


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class EncoderDir:
    """A trained encoder on disk (an artifact directory or a training run): its checkpoint, settings,
    buckets, and how it was trained (for reports that compare runs)."""

    hf_dir: Path
    settings: EncoderSettings
    buckets: PercentileBuckets
    history_negatives: bool
    matryoshka_dims: tuple[int, ...]  # the prefix sizes it was trained for (none: untuned)
    train_report: dict[str, object] | None

    @classmethod
    def load(cls, root: Path) -> EncoderDir:
        hf = root / "hf" if (root / "hf").is_dir() else root / "model"
        if not (hf / "config.json").exists():
            raise FileNotFoundError(f"{root}: no checkpoint in hf/ or model/")
        config, report = cls._training(root, hf)
        return cls(
            hf,
            EncoderSettings.load(root / "serving.json"),
            PercentileBuckets.load(root / "buckets.json"),
            config.get("extra", {}).get("history") == "engaged+disliked",
            tuple(config.get("matryoshka_dims", ())),
            json.loads(report.read_text()) if report.exists() else None,
        )

    @staticmethod
    def _training(root: Path, hf: Path) -> tuple[dict, Path]:
        """(training config, train report path): a run directory holds both; an artifact directory
        built from an adapter package finds them in the package it records in hf/import.json."""
        if (root / "train_config.json").exists():
            return json.loads((root / "train_config.json").read_text()), root / "train_report.json"
        imported = hf / "import.json"
        adapter = json.loads(imported.read_text()).get("adapter") if imported.exists() else None
        if not adapter:
            return {}, root / "train_report.json"
        package = Path(adapter)
        meta = json.loads((package / ADAPTER_META).read_text()) if (package / ADAPTER_META).exists() else {}
        report = package / "train_report.json"  # the bundled package keeps it beside the adapter
        return meta.get("train_config", {}), report if report.exists() else package.parent / "train_report.json"
