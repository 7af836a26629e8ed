"""Running a shard directory: prefill and decode through the layer and head shards, with the KV
cache, the embedding lookup and the RoPE tables and masks on the host (docs/coreml-shards.md).

    runtime = ShardRuntime("out/", backend="mil")
    logits = runtime.prefill(prompt_ids)      # [T, vocab] float32
    next_logits = runtime.decode(token)       # [vocab], one position further
    runtime.logits(ids)                       # a fresh prefill: the golden check through the shards
    runtime.prompt_logits([ids_a, ids_b])     # several fresh prefills at once (below)

Prefill runs the ``prefill`` function over chunks of the build's ``chunk`` tokens; a last chunk
of one token runs ``decode``, a shorter last chunk is padded and its padding masked. After every
call each layer's ``k_new``/``v_new`` for the real tokens is written into the host cache at their
positions, so cache slot j always holds position j.

An MoE layer's package ends before its experts: the host routes each token (softmax over all
experts, top-k, renormalized, times ``ffn_down_exps.scale``, in float32 as the reference), runs
each chosen expert's function on the tokens routed to it, sums their weighted outputs and hands
the sum to the next package, which opens with the layer's combine (docs/moe-shards.md).

Gemma 4 E2B/E4B: the host also reads each token's row of the per-layer embedding table and hands
every layers package the token embeddings and its layers' per-layer rows; a KV-shared layer in a
later package gets its source layer's keys and values of the call as they came out of the source's
package (docs/moe-shards.md).

``prompt_logits`` runs several prompts together, package by package: every chunk of every
prompt through one package before the next, each prompt with its own cache. An MoE layer's
expert then runs once on every token routed to it from any prompt, so the MIL interpreter
decodes each expert's weights once per layer instead of once per prompt and chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anepack.coreml import moe
from anepack.coreml.moe import EMBEDDED
from anepack.coreml.builder import (
    MASK_HIDDEN, cache_shape, host_inputs, kv_layers, kv_source, moe_layers, per_layer_width,
)
from anepack.coreml.manifest import ShardEntry, read_manifest
from anepack.errors import AnepackError
from anepack.reference.gemma4 import Router, own_routing
from anepack.runtime.backends import ShardEngine, open_shard
from anepack.runtime.host_files import read_config
from anepack.tokenizer import checked_tokens


class ShardRuntime:
    """A built shard directory loaded for generation with ``backend`` (``mil`` or ``coreml``).

    ``hold_weights``: keep every package's decoded weights between calls (generation decodes
    each package once). False releases a package's decoded weights as soon as every chunk of a
    call has run through it, so memory holds one package's weights: a check that runs all its
    prompts in one call through a deep model (30 layers of 26B-A4B decode to gigabytes)."""

    def __init__(self, out_dir: str | Path, backend: str = "mil", hold_weights: bool = True):
        self.out_dir = Path(out_dir)
        self.backend = backend
        self.hold_weights = hold_weights
        self.manifest = read_manifest(self.out_dir)
        self.config = read_config(self.out_dir)
        if self.config.architecture != self.manifest.architecture:
            raise AnepackError(self.out_dir, f"config.json describes {self.config.architecture}, "
                                             f"the manifest {self.manifest.architecture}")
        self.chunk = self.manifest.chunk
        self.context = self.manifest.context
        self.embeddings = self._host_table(self.manifest.embeddings, self.config.n_embd)
        self.per_layer_embeddings = None  # Gemma 4 E2B/E4B: [vocab, n_layers * n_embd_per_layer]
        if per_layer_width(self.config):
            if self.manifest.per_layer_embeddings is None:
                raise AnepackError(self.out_dir, "the manifest lists no per-layer embedding table")
            self.per_layer_embeddings = self._host_table(
                self.manifest.per_layer_embeddings, self.config.n_layers * per_layer_width(self.config))
        layer_entries = sorted((e for e in self.manifest.shards if e.kind == "layers"), key=lambda e: e.layers[0])
        head_entries = sorted((e for e in self.manifest.shards if e.kind == "head"), key=lambda e: e.vocab[0])
        self._check_coverage(layer_entries, head_entries)
        self._layers = [(entry, open_shard(self.out_dir / entry.file, backend)) for entry in layer_entries]
        self._heads = [(entry, open_shard(self.out_dir / entry.file, backend)) for entry in head_entries]
        self._routed = moe_layers(self.config)
        # E2B/E4B: the layers whose keys and values later layers reuse
        sources = (kv_source(self.config, il) for il in range(self.config.n_layers))
        self._kv_sources = {source for il, source in enumerate(sources) if source != il}
        # The host's routing, as the reference's (a hook: a check records the experts chosen).
        self.router: Router = own_routing
        self._experts = self._expert_shards()
        self._rope_freqs = None if self.manifest.rope_freqs is None else np.array(self.manifest.rope_freqs)
        self._cache = self._empty_cache()
        self.position = 0

    def reset(self) -> None:
        """Forget the sequence: the next call starts at position 0 with an empty cache."""
        for cache in self._cache.values():
            cache.fill(0)
        self.position = 0

    def prefill(self, tokens) -> np.ndarray:
        """Run ``tokens`` from the current position on; float32 logits ``[len(tokens), vocab]``."""
        tokens = self._checked(tokens, self.position)
        pieces = self._call(self._chunks(tokens, self.position, self._cache, self.router))
        self.position += len(tokens)
        return np.concatenate(pieces)

    def decode(self, token: int) -> np.ndarray:
        """Run one token at the current position; float32 logits ``[vocab]``."""
        logits = self._call(self._chunks(self._checked([token], self.position), self.position, self._cache,
                                         self.router))[0]
        self.position += 1
        return logits[0]

    def logits(self, tokens) -> np.ndarray:
        """Logits ``[T, vocab]`` of a fresh prefill over ``tokens`` from position 0."""
        self.reset()
        return self.prefill(tokens)

    def prompt_logits(self, token_lists, routers: list[Router] | None = None) -> list[np.ndarray]:
        """Each prompt's logits ``[T, vocab]`` from position 0, as ``logits`` gives them, with
        all prompts run together package by package (each with its own cache; the runtime's
        own sequence is left as it was). ``routers``: one routing hook per prompt, so each
        prompt's choices can be recorded apart; default ``self.router`` for all."""
        token_lists = [self._checked(tokens, 0) for tokens in token_lists]
        routers = routers or [self.router] * len(token_lists)
        if len(routers) != len(token_lists):
            raise ValueError(f"{len(routers)} routers for {len(token_lists)} prompts")
        chunks = [self._chunks(tokens, 0, self._empty_cache(), router)
                  for tokens, router in zip(token_lists, routers)]
        logits = iter(self._call([chunk for prompt in chunks for chunk in prompt]))
        return [np.concatenate([next(logits) for _ in prompt]) for prompt in chunks]

    # --- internals -------------------------------------------------------------------

    def _host_table(self, entry: ShardEntry, width: int) -> np.ndarray:
        path = self.out_dir / entry.file
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)  # rows are read on lookup only
        except (OSError, ValueError) as err:
            raise AnepackError(path, f"unreadable embedding table ({err})") from None
        expected = (self.config.vocab_size, width)
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

    def _checked(self, tokens, start: int) -> np.ndarray:
        tokens = checked_tokens(tokens, self.config.vocab_size)
        if start + tokens.size > self.context:
            raise AnepackError(self.out_dir, f"{start + tokens.size} positions exceed the build's context "
                                             f"of {self.context} tokens")
        return tokens

    def _empty_cache(self) -> dict[str, np.ndarray]:
        return {
            f"{kind}_cache_{il}": np.zeros(cache_shape(self.config, il, self.context), np.float16)
            for il in kv_layers(self.config) for kind in ("k", "v")
        }

    def _chunks(self, tokens: np.ndarray, start: int, cache: dict, router: Router) -> list[_Chunk]:
        """``tokens`` from ``start`` cut into calls of at most ``chunk`` tokens (one token: ``decode``)."""
        return [
            _Chunk("decode" if len(piece) == 1 else "prefill", piece, start + begin, cache, router)
            for begin in range(0, len(tokens), self.chunk) for piece in [tokens[begin:begin + self.chunk]]
        ]

    def _call(self, chunks: list[_Chunk]) -> list[np.ndarray]:
        """Every chunk through every package, package by package; float32 logits ``[count, vocab]``
        per chunk. Chunks of one sequence come in order: each writes its keys and values into its
        cache before the next chunk reads them in the same package."""
        boundaries, host = [], []
        for chunk in chunks:
            count, width = len(chunk.tokens), chunk.width(self.chunk)
            # Padding repeats the last real token: in-range activations, so the padded keys the
            # mask hides stay finite (a NaN key would poison the masked scores anyway).
            padded = np.concatenate([chunk.tokens, np.full(width - count, chunk.tokens[-1])])
            embedded = np.asarray(self.embeddings[padded], dtype=np.float16)[None]
            boundaries.append({"hidden": embedded})
            host.append(self._host_inputs(chunk.start, count, width) | self._per_layer_inputs(padded, embedded))
        for entry, shard in self._layers:
            trunks = []
            for chunk, boundary, inputs in zip(chunks, boundaries, host):
                outputs = self._run(entry, shard, chunk.function, {**inputs, **chunk.cache, **boundary})
                count = len(chunk.tokens)
                for name in [name for name in outputs if name.startswith(("k_new_", "v_new_"))]:
                    kind, il = name[0], name.rsplit("_", 1)[1]
                    new = outputs.pop(name)
                    chunk.cache[f"{kind}_cache_{il}"][:, :, chunk.start:chunk.start + count] = new[:, :, :count]
                    if int(il) in self._kv_sources:  # a KV-shared layer in a later package reads them as they came out
                        inputs[f"{kind}_shared_{il}"] = new
                trunks.append(outputs)
            last = entry.layers[-1]
            if self._routed[last]:
                residual, dense, _, _ = moe.TRUNK_OUTPUTS
                routed = self._run_experts(last, trunks, chunks)
                boundaries = [dict(zip(moe.COMBINE_INPUTS, (trunk[residual], trunk[dense], summed)))
                              for trunk, summed in zip(trunks, routed)]
            else:
                boundaries = [{"hidden": trunk["hidden_out"]} for trunk in trunks]
            self._done_with(shard)
        logits = [[] for _ in chunks]
        for entry, shard in self._heads:
            for chunk, boundary, pieces in zip(chunks, boundaries, logits):
                outputs = self._run(entry, shard, chunk.function, boundary)
                pieces += [outputs[spec.name][0, :len(chunk.tokens)] for spec in entry.functions[chunk.function].outputs]
            self._done_with(shard)
        return [np.concatenate(pieces, axis=-1).astype(np.float32) for pieces in logits]

    def _done_with(self, shard: ShardEngine) -> None:
        if not self.hold_weights:
            shard.release()

    def _run_experts(self, il: int, trunks: list[dict[str, np.ndarray]], chunks: list[_Chunk]) -> list[np.ndarray]:
        """Per chunk, the routed sum ``[1, width, D]`` float16 of MoE layer ``il`` for its real tokens.

        Routing per chunk in float32 as the reference, through the chunk's router. Each chosen
        expert then runs on the tokens routed to it from every chunk, in pieces of at most
        ``chunk`` rows (a one-row piece through its ``decode`` function, else ``prefill``
        zero-padded: an expert maps zero rows to zero), and its decoded weights are released
        before the next expert's."""
        _, _, expert_in, router_logits = moe.TRUNK_OUTPUTS
        scales = self.manifest.expert_down_scales.get(il)
        inputs, routes, sums = [], [], []
        for trunk, chunk in zip(trunks, chunks):
            count = len(chunk.tokens)
            inputs.append(trunk[expert_in][0, :count])
            routes.append(chunk.router(il, trunk[router_logits][0, :count].astype(np.float32),
                                       self.config.n_expert_used[il]))
            sums.append(np.zeros(trunk[expert_in].shape[1:], np.float32))
        for expert in np.unique(np.concatenate([chosen.ravel() for chosen, _ in routes])):
            # (chunk, its rows routed to this expert, their weights), rows of every chunk stacked
            routed_rows = []
            for index, (chosen, routing) in enumerate(routes):
                rows, slots = np.nonzero(chosen == expert)
                weight = routing[rows, slots] if scales is None else routing[rows, slots] * np.float32(scales[expert])
                routed_rows += [(index, row, w) for row, w in zip(rows, weight)]
            x = np.stack([inputs[index][row] for index, row, _ in routed_rows])
            out = self._expert_rows(il, int(expert), x)
            for (index, row, weight), y in zip(routed_rows, out):
                sums[index][row] += y.astype(np.float32) * weight
        return [summed.astype(np.float16)[None] for summed in sums]

    def _expert_rows(self, il: int, expert: int, x: np.ndarray) -> np.ndarray:
        """Expert ``expert`` of layer ``il`` on rows ``x [n, D]`` float16; its outputs ``[n, D]``."""
        entry, shard = next(item for item in self._experts[il] if item[0].experts[0] <= expert < item[0].experts[1])
        out = np.empty_like(x)
        for begin in range(0, len(x), self.chunk):
            piece = x[begin:begin + self.chunk]
            mode, width = ("decode", 1) if len(piece) == 1 else ("prefill", self.chunk)
            tokens = np.zeros((1, width, x.shape[1]), np.float16)
            tokens[0, :len(piece)] = piece
            result = self._run(entry, shard, moe.expert_function(expert, mode), {moe.EXPERT_INPUT: tokens})
            out[begin:begin + len(piece)] = result[moe.EXPERT_OUTPUT][0, :len(piece)]
        shard.release()  # a layer's experts decoded are gigabytes: hold one at a time
        return out

    def _run(self, entry: ShardEntry, shard: ShardEngine, function: str, available: dict) -> dict:
        specs = entry.functions[function]
        missing = [spec.name for spec in specs.inputs if spec.name not in available]
        if missing:
            raise AnepackError(self.out_dir / entry.file, f"function {function} wants input {missing[0]}, "
                                                          "which the runtime does not provide")
        return shard.run(function, {spec.name: available[spec.name] for spec in specs.inputs})

    def _per_layer_inputs(self, padded: np.ndarray, embedded: np.ndarray) -> dict[str, np.ndarray]:
        """E2B/E4B: the token embeddings and each layer's per-layer token rows ``[1, width, n]``."""
        if self.per_layer_embeddings is None:
            return {}
        rows = np.asarray(self.per_layer_embeddings[padded], dtype=np.float16)
        rows = rows.reshape(len(padded), self.config.n_layers, per_layer_width(self.config))
        return {EMBEDDED: embedded} | {f"per_layer_{il}": rows[None, :, il] for il in range(self.config.n_layers)}

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


@dataclass
class _Chunk:
    """One call's tokens of one sequence: the function that runs them, their first position,
    the sequence's KV cache and its routing hook."""

    function: str
    tokens: np.ndarray
    start: int
    cache: dict[str, np.ndarray]
    router: Router

    def width(self, chunk: int) -> int:
        """Rows of the call: the build's chunk for ``prefill``, one for ``decode``."""
        return chunk if self.function == "prefill" else 1
