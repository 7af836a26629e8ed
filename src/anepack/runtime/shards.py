"""Running a shard directory: prefill and decode through the layer and head shards, with the KV
cache, the embedding lookup and the RoPE tables and masks on the host (docs/coreml-shards.md).

    runtime = ShardRuntime("out/", backend="mil")
    logits = runtime.prefill(prompt_ids)      # [T, vocab] float32
    next_logits = runtime.decode(token)       # [vocab], one position further
    runtime.logits(ids)                       # a fresh prefill: the golden check through the shards

Prefill runs the ``prefill`` function over chunks of the build's ``chunk`` tokens; a last chunk
of one token runs ``decode``, a shorter last chunk is padded and its padding masked. After every
call each layer's ``k_new``/``v_new`` for the real tokens is written into the host cache at their
positions, so cache slot j always holds position j.

An MoE layer's package ends before its experts: the host routes each token (softmax over all
experts, top-k, renormalized, times ``ffn_down_exps.scale``, in float32 as the reference), runs
each chosen expert's function on the tokens routed to it, sums their weighted outputs and hands
the sum to the next package, which opens with the layer's combine (docs/moe-shards.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anepack.coreml import moe
from anepack.coreml.builder import MASK_HIDDEN, cache_shape, host_inputs, moe_layers
from anepack.coreml.manifest import ShardEntry, read_manifest
from anepack.errors import AnepackError
from anepack.reference.gemma4 import Router, own_routing
from anepack.runtime.backends import ShardEngine, open_shard
from anepack.runtime.host_files import read_config
from anepack.tokenizer import checked_tokens


class ShardRuntime:
    """A built shard directory loaded for generation with ``backend`` (``mil`` or ``coreml``)."""

    def __init__(self, out_dir: str | Path, backend: str = "mil"):
        self.out_dir = Path(out_dir)
        self.backend = backend
        self.manifest = read_manifest(self.out_dir)
        self.config = read_config(self.out_dir)
        if self.config.architecture != self.manifest.architecture:
            raise AnepackError(self.out_dir, f"config.json describes {self.config.architecture}, "
                                             f"the manifest {self.manifest.architecture}")
        self.chunk = self.manifest.chunk
        self.context = self.manifest.context
        self.embeddings = self._embedding_table()
        layer_entries = sorted((e for e in self.manifest.shards if e.kind == "layers"), key=lambda e: e.layers[0])
        head_entries = sorted((e for e in self.manifest.shards if e.kind == "head"), key=lambda e: e.vocab[0])
        self._check_coverage(layer_entries, head_entries)
        self._layers = [(entry, open_shard(self.out_dir / entry.file, backend)) for entry in layer_entries]
        self._heads = [(entry, open_shard(self.out_dir / entry.file, backend)) for entry in head_entries]
        self._routed = moe_layers(self.config)
        # The host's routing, as the reference's (a hook: a check records the experts chosen).
        self.router: Router = own_routing
        self._experts = self._expert_shards()
        self._rope_freqs = None if self.manifest.rope_freqs is None else np.array(self.manifest.rope_freqs)
        self._cache = {
            f"{kind}_cache_{il}": np.zeros(cache_shape(self.config, il, self.context), np.float16)
            for il in range(self.config.n_layers) for kind in ("k", "v")
        }
        self.position = 0

    def reset(self) -> None:
        """Forget the sequence: the next call starts at position 0 with an empty cache."""
        for cache in self._cache.values():
            cache.fill(0)
        self.position = 0

    def prefill(self, tokens) -> np.ndarray:
        """Run ``tokens`` from the current position on; float32 logits ``[len(tokens), vocab]``."""
        tokens = self._checked(tokens)
        pieces = []
        for begin in range(0, len(tokens), self.chunk):
            piece = tokens[begin:begin + self.chunk]
            pieces.append(self._call("decode" if len(piece) == 1 else "prefill", piece))
        return np.concatenate(pieces)

    def decode(self, token: int) -> np.ndarray:
        """Run one token at the current position; float32 logits ``[vocab]``."""
        return self._call("decode", self._checked([token]))[0]

    def logits(self, tokens) -> np.ndarray:
        """Logits ``[T, vocab]`` of a fresh prefill over ``tokens`` from position 0."""
        self.reset()
        return self.prefill(tokens)

    # --- internals -------------------------------------------------------------------

    def _embedding_table(self) -> np.ndarray:
        path = self.out_dir / self.manifest.embeddings.file
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)  # rows are read on lookup only
        except (OSError, ValueError) as err:
            raise AnepackError(path, f"unreadable embedding table ({err})") from None
        expected = (self.config.vocab_size, self.config.n_embd)
        if table.shape != expected or table.dtype != np.float16:
            raise AnepackError(path, f"embedding table is {table.dtype} {table.shape}, expected float16 {expected}")
        return table

    def _check_coverage(self, layer_entries: list[ShardEntry], head_entries: list[ShardEntry]) -> None:
        layers = [il for entry in layer_entries for il in entry.layers]
        if layers != list(range(self.config.n_layers)):
            raise AnepackError(self.out_dir, f"the layer shards run layers {layers}, "
                                             f"not 0..{self.config.n_layers - 1} in order")
        stops = [0] + [entry.vocab[1] for entry in head_entries]
        starts = [entry.vocab[0] for entry in head_entries] + [self.config.vocab_size]
        if not head_entries or stops != starts:
            raise AnepackError(self.out_dir, f"the head shards do not cover the vocabulary 0..{self.config.vocab_size}")

    def _expert_shards(self) -> dict[int, list[tuple[ShardEntry, ShardEngine]]]:
        """Per MoE layer, its expert packages, which must cover every expert exactly once."""
        by_layer: dict[int, list[ShardEntry]] = {}
        for entry in self.manifest.shards:
            if entry.kind == "experts":
                by_layer.setdefault(entry.layers[0], []).append(entry)
        shards = {}
        for il in (il for il, routed in enumerate(self._routed) if routed):
            entries = sorted(by_layer.get(il, []), key=lambda e: e.experts[0])
            bounds = [0] + [stop for _, stop in (e.experts for e in entries)]
            if bounds[:-1] != [e.experts[0] for e in entries] or bounds[-1] != self.config.n_expert:
                raise AnepackError(self.out_dir, f"the expert shards of layer {il} do not cover experts "
                                                 f"0..{self.config.n_expert - 1}")
            shards[il] = [(entry, open_shard(self.out_dir / entry.file, self.backend)) for entry in entries]
        return shards

    def _checked(self, tokens) -> np.ndarray:
        tokens = checked_tokens(tokens, self.config.vocab_size)
        if self.position + tokens.size > self.context:
            raise AnepackError(self.out_dir, f"{self.position + tokens.size} positions exceed the build's context "
                                             f"of {self.context} tokens")
        return tokens

    def _call(self, function: str, tokens: np.ndarray) -> np.ndarray:
        """One call of ``function`` on every shard for ``tokens`` at the current position."""
        count, start = len(tokens), self.position
        width = self.chunk if function == "prefill" else 1
        # Padding repeats the last real token: in-range activations, so the padded keys the
        # mask hides stay finite (a NaN key would poison the masked scores anyway).
        padded = np.concatenate([tokens, np.full(width - count, tokens[-1])])
        hidden = np.asarray(self.embeddings[padded], dtype=np.float16)[None]
        available = {**self._host_inputs(start, count, width), **self._cache}
        boundary = {"hidden": hidden}
        for entry, shard in self._layers:
            outputs = self._run(entry, shard, function, {**available, **boundary})
            for il in entry.layers:
                for kind in ("k", "v"):
                    new = outputs[f"{kind}_new_{il}"]
                    self._cache[f"{kind}_cache_{il}"][:, :, start:start + count] = new[:, :, :count]
            last = entry.layers[-1]
            if self._routed[last]:
                residual, dense, _, _ = moe.TRUNK_OUTPUTS
                routed = self._run_experts(last, outputs, count)
                boundary = dict(zip(moe.COMBINE_INPUTS, (outputs[residual], outputs[dense], routed)))
            else:
                boundary = {"hidden": outputs["hidden_out"]}
        logits = []
        for entry, shard in self._heads:
            outputs = self._run(entry, shard, function, boundary)
            logits += [outputs[spec.name][0, :count] for spec in entry.functions[function].outputs]
        self.position += count
        return np.concatenate(logits, axis=-1).astype(np.float32)

    def _run_experts(self, il: int, trunk: dict[str, np.ndarray], count: int) -> np.ndarray:
        """The routed sum ``[1, width, D]`` float16 of MoE layer ``il`` for the ``count`` real tokens.

        Routing in float32 as the reference; an expert runs once per call on the tokens routed
        to it (its ``decode`` function for one token, else ``prefill`` zero-padded to the chunk:
        an expert maps zero rows to zero)."""
        _, _, expert_in, router_logits = moe.TRUNK_OUTPUTS
        x = trunk[expert_in][0, :count]
        chosen, routing = self.router(il, trunk[router_logits][0, :count].astype(np.float32),
                                      self.config.n_expert_used[il])
        scales = self.manifest.expert_down_scales.get(il)
        routed = np.zeros(trunk[expert_in].shape[1:], np.float32)
        for expert in np.unique(chosen):
            rows, slots = np.nonzero(chosen == expert)
            weight = routing[rows, slots] if scales is None else routing[rows, slots] * np.float32(scales[expert])
            mode, width = ("decode", 1) if len(rows) == 1 else ("prefill", self.chunk)
            tokens = np.zeros((1, width, x.shape[1]), np.float16)
            tokens[0, :len(rows)] = x[rows]
            entry, shard = next(item for item in self._experts[il] if item[0].experts[0] <= expert < item[0].experts[1])
            out = self._run(entry, shard, moe.expert_function(int(expert), mode), {moe.EXPERT_INPUT: tokens})
            shard.release()  # a layer's experts decoded are gigabytes: hold one at a time
            routed[rows] += out[moe.EXPERT_OUTPUT][0, :len(rows)].astype(np.float32) * weight[:, None]
        return routed.astype(np.float16)[None]

    def _run(self, entry: ShardEntry, shard: ShardEngine, function: str, available: dict) -> dict:
        specs = entry.functions[function]
        missing = [spec.name for spec in specs.inputs if spec.name not in available]
        if missing:
            raise AnepackError(self.out_dir / entry.file, f"function {function} wants input {missing[0]}, "
                                                          "which the runtime does not provide")
        return shard.run(function, {spec.name: available[spec.name] for spec in specs.inputs})

    def _host_inputs(self, start: int, count: int, width: int) -> dict[str, np.ndarray]:
        """RoPE tables and masks for ``count`` real tokens at ``start``, padded to ``width`` rows."""
        real = host_inputs(self.config, start, count, self.context, self._rope_freqs)
        if count == width:
            return real
        padded = {}
        context, pad = self.context, np.arange(count, width)
        for name, table in real.items():
            if name.startswith("mask_"):
                mask = np.full((width, context + width), MASK_HIDDEN, np.float16)
                mask[:count, :context + count] = table  # real queries never see a padded key
                mask[pad, context + pad] = 0  # a padded query sees itself: no all-hidden softmax row
                padded[name] = mask
            else:  # cos/sin rows of padded queries: any finite rotation; repeat the last one
                padded[name] = np.concatenate([table, np.repeat(table[-1:], width - count, axis=0)])
        return padded
