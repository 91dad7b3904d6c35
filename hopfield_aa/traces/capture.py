"""Capturing attention traces from a diffusers model: install recording processors and a step counter,
copy the selected Q/K/V to CPU, and stream them into a capture directory (see :mod:`.format`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch

from hopfield_aa.adapters import AttentionCall, resolve_model
from hopfield_aa.traces.format import ShardWriter, dtype_name, parse_dtype
from hopfield_aa.traces.processors import RECORDING_PROCESSORS
from hopfield_aa.traces.selection import Selection


def config_hash(model: torch.nn.Module) -> str:
    """SHA-256 of the model's diffusers config (keys starting with ``_`` left out: paths, versions)."""
    config = getattr(model, "config", None)
    items = {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}
    text = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    for parameter in model.parameters():
        return parameter.dtype, parameter.device
    return torch.float32, torch.device("cpu")


def device_name(device: torch.device) -> str:
    """A readable name of ``device`` (the GPU model, or the CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {platform.processor() or platform.machine()}"


def run_metadata(model: torch.nn.Module, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metadata stored with a capture: model class, config hash, dtype, device, library versions."""
    import diffusers

    dtype, device = _model_dtype_device(model)
    meta: dict[str, Any] = {
        "model_class": type(model).__name__,
        "config_hash": config_hash(model),
        "model_dtype": dtype_name(dtype) if dtype.is_floating_point else str(dtype),
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "created_unix": time.time(),
    }
    if extra:
        meta.update(extra)
    return meta


class TraceCapture:
    """Records Q, K, V of a diffusers model's attention calls into a capture directory.

    Each selected attention module gets a recording processor (a line-for-line copy of the stock one with
    one added call), so the model's outputs are bit-identical with and without capture. A forward
    pre-hook on the model counts denoising steps (one step per model forward call since the last
    :meth:`begin_run`) and reads ``timestep``. Each attention call yields one record per selected batch
    row: ``q`` (heads, queries, head_dim), ``k``/``v`` (heads, keys, head_dim), exactly as they enter
    ``softmax(scale · Q Kᵀ) V``, copied to CPU in ``dtype``.

    Parameters
    ----------
    model : diffusers model or pipeline
        ``UNet2DConditionModel`` (``AttnProcessor2_0``), ``SD3Transformer2DModel``
        (``JointAttnProcessor2_0``), ``FluxTransformer2DModel`` (``FluxAttnProcessor``), or a pipeline
        holding one as ``unet``/``transformer``.
    directory : str or Path
        Where shards and the manifest go.
    selection : Selection, optional
        Which layers, kinds, steps, heads, batch rows and query tokens to keep (default: everything).
    dtype : torch.dtype or str, optional
        Storage dtype (default: the dtype of the tensors in the model, i.e. the model's dtype).
        ``"float16"`` halves the size of a float32 model.
    shard_bytes : int, default 64 MiB
        Shard size; a shard is also closed at every step boundary, so an interruption loses at most the
        step in progress.
    metadata : Mapping, optional
        Extra run metadata (e.g. the pipeline class, prompts file).
    overwrite : bool, default False
        Replace an existing capture in ``directory``.
    on_shard : callable, optional
        ``on_shard(n_shards, file_name)`` after each shard is committed to the manifest.
    key_prefix : str, default ""
        Prefix of the record keys (a split capture gives each rank its own; see :mod:`.ranks`).

    Examples
    --------
    >>> import tempfile, torch
    >>> from diffusers import UNet2DConditionModel
    >>> unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
    ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
    ...     attention_head_dim=4, norm_num_groups=4)
    >>> out = tempfile.mkdtemp()
    >>> with TraceCapture(unet, out, selection=Selection(kinds=["cross"])) as cap:
    ...     cap.begin_run(prompt_id=0, seed=0)
    ...     _ = unet(torch.randn(1, 4, 8, 8), 999, encoder_hidden_states=torch.randn(1, 5, 12))
    >>> cap.n_records  # the four cross-attention layers, one batch row
    4
    """

    def __init__(
        self,
        model: Any,
        directory: str | os.PathLike[str],
        *,
        selection: Selection | None = None,
        dtype: torch.dtype | str | None = None,
        shard_bytes: int = 64 * 2**20,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        on_shard: Callable[[int, str], None] | None = None,
        key_prefix: str = "",
    ) -> None:
        self.model = resolve_model(model)
        self.directory = directory
        self.selection = selection if selection is not None else Selection()
        if not isinstance(self.selection, Selection):
            raise TypeError(f"selection must be a Selection, got {type(self.selection).__name__}")
        self.dtype = parse_dtype(dtype)
        self.shard_bytes = shard_bytes
        self.overwrite = overwrite
        self.on_shard = on_shard
        self.key_prefix = key_prefix
        extra = dict(metadata or {})
        extra["storage_dtype"] = None if self.dtype is None else dtype_name(self.dtype)
        if model is not self.model:
            extra.setdefault("pipeline_class", type(model).__name__)
        self.metadata = run_metadata(self.model, extra)
        self.step = -1
        self.timestep: float | None = None
        self.text_tokens: int | None = None
        self.prompt_id: int | None = None
        self.seed: int | None = None
        self.layers: list[str] = []
        self._writer: ShardWriter | None = None
        self._originals: dict[Any, Any] = {}
        self._hook: Any = None
        self._signature = inspect.signature(self.model.forward)

    # ----------------------------------------------------------------------------------------- setup
    def __enter__(self) -> TraceCapture:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(complete=exc_type is None)

    def start(self) -> None:
        """Install the recording processors and the step hook, and open the capture directory."""
        if self._writer is not None:
            raise RuntimeError("capture already started")
        targets = []
        for name, module in self.model.named_modules():
            processor = getattr(module, "processor", None)
            if processor is None or not hasattr(module, "set_processor"):
                continue
            if not self.selection.matches_layer(name):
                continue
            recording = RECORDING_PROCESSORS.get(type(processor))
            if recording is None:
                raise TypeError(
                    f"layer {name!r} uses {type(processor).__name__}, which capture does not support "
                    f"(supported: {', '.join(t.__name__ for t in RECORDING_PROCESSORS)}); "
                    "leave it out with Selection(layers=...)"
                )
            targets.append((name, module, processor, recording))
        if not targets:
            raise ValueError(
                f"no attention layer of {type(self.model).__name__} matches layers={self.selection.layers}"
            )
        self._writer = ShardWriter(
            self.directory,
            metadata={**self.metadata, "layers": [name for name, *_ in targets]},
            selection=self.selection.to_json(),
            shard_bytes=self.shard_bytes,
            overwrite=self.overwrite,
            on_shard=self.on_shard,
            key_prefix=self.key_prefix,
        )
        for name, module, processor, recording in targets:
            new = recording(name, self)
            # Keep per-instance settings of the stock processor (e.g. an attention backend).
            for attr in ("_attention_backend", "_parallel_config"):
                if attr in vars(processor):
                    setattr(new, attr, getattr(processor, attr))
            self._originals[module] = processor
            module.set_processor(new)
        self.layers = [name for name, *_ in targets]
        self._hook = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def stop(self, *, complete: bool = True) -> None:
        """Restore the original processors, write what is buffered and close the manifest."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for module, processor in self._originals.items():
            module.set_processor(processor)
        self._originals.clear()
        if self._writer is not None:
            self._writer.close(complete=complete)

    # ------------------------------------------------------------------------------------------ runs
    def begin_run(self, *, prompt_id: int | None = None, seed: int | None = None, **info: Any) -> None:
        """Start a new sampling run: steps count from 0 again; records carry ``prompt_id`` and ``seed``.

        Extra keyword arguments (``prompt="..."``, ``steps=50``) are stored in the manifest's ``runs``.
        """
        writer = self._require_writer()
        writer.flush()
        self.step, self.timestep, self.text_tokens = -1, None, None
        self.prompt_id, self.seed = prompt_id, seed
        writer.add_run({"prompt_id": prompt_id, "seed": seed, **info})

    @property
    def n_records(self) -> int:
        """Records captured so far."""
        return 0 if self._writer is None else self._writer.n_records

    @property
    def n_shards(self) -> int:
        """Shards written so far."""
        return 0 if self._writer is None else self._writer.n_shards

    def _require_writer(self) -> ShardWriter:
        if self._writer is None:
            raise RuntimeError("capture is not started: use it as a context manager or call start()")
        return self._writer

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        writer = self._require_writer()
        writer.flush()  # one step per shard at most: an interruption loses only the step in progress
        self.step += 1
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        timestep = bound.get("timestep")
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.flatten()[0].item() if timestep.numel() else None
        self.timestep = None if timestep is None else float(timestep)
        text = bound.get("encoder_hidden_states")
        self.text_tokens = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else None

    # ------------------------------------------------------------------------------------- recording
    def record(self, layer: str, call: AttentionCall, *, scale: float) -> None:
        """Copy the selected parts of one attention call (``call.query`` etc. of shape (B, H, N, d))."""
        kind, query, key, value = call.kind, call.query, call.key, call.value
        selection, step = self.selection, max(self.step, 0)
        if not (selection.matches_step(step) and selection.matches_kind(kind)):
            return
        writer = self._require_writer()
        batch, num_heads, n_query, head_dim = query.shape
        n_key = key.shape[2]
        heads = selection.head_indices(num_heads)
        if not heads:
            return
        head_index = None if len(heads) == num_heads else torch.tensor(heads, device=query.device)
        dtype = self.dtype if self.dtype is not None else query.dtype
        mask = _mask_4d(call.attention_mask)
        for row in selection.batch_rows(batch):
            indices = selection.query_indices(n_query, layer=layer, step=step, batch_index=row)
            q, k, v = query[row].detach(), key[row].detach(), value[row].detach()
            if head_index is not None:
                q, k, v = q[head_index], k[head_index], v[head_index]
            if indices is not None:
                q = q[:, indices.to(q.device)]
            tensors = {
                "q": q.to(device="cpu", dtype=dtype, copy=True),
                "k": k.to(device="cpu", dtype=dtype, copy=True),
                "v": v.to(device="cpu", dtype=dtype, copy=True),
                "query_indices": torch.arange(n_query) if indices is None else indices,
            }
            if mask is not None:
                m = mask[row if mask.shape[0] > 1 else 0].detach()
                if head_index is not None and m.shape[0] > 1:
                    m = m[head_index]
                if indices is not None and m.shape[1] > 1:
                    m = m[:, indices.to(m.device)]
                if m.dtype == torch.bool:
                    m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, -torch.inf)
                tensors["mask"] = m.to(device="cpu", dtype=torch.float32, copy=True)
            entry = {
                "key": writer.next_key(),
                "layer": layer,
                "kind": kind,
                "step": step,
                "timestep": self.timestep,
                "scale": float(scale),
                "num_heads": int(num_heads),
                "heads": heads,
                "head_dim": int(head_dim),
                "query_tokens": int(n_query),
                "key_tokens": int(n_key),
                "query_segments": {k: list(r) for k, r in call.query_segments.items()},
                "key_segments": {k: list(r) for k, r in call.key_segments.items()},
                "batch_index": row,
                "prompt_id": self.prompt_id,
                "seed": self.seed,
                "query_seed": None if indices is None else int(selection.query_seed),
                "dtype": dtype_name(dtype),
            }
            writer.add(entry, tensors)


def _mask_4d(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An attention mask as (batch or 1, heads or 1, queries or 1, keys)."""
    if mask is None:
        return None
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask


def capture(model: Any, directory: str | os.PathLike[str], **kwargs: Any) -> TraceCapture:
    """Shorthand for :class:`TraceCapture` (use it as a context manager).

    Selection keywords (``layers``, ``kinds``, ``steps``, ``heads``, ``max_query_tokens``,
    ``batch_indices``, ``query_seed``) build the :class:`Selection`; the rest go to :class:`TraceCapture`.

    Examples
    --------
    >>> with capture(pipe, "traces/", kinds=["cross"], max_query_tokens=256) as cap:  # doctest: +SKIP
    ...     cap.begin_run(prompt_id=0, seed=0)
    ...     pipe("a red circle", generator=torch.Generator().manual_seed(0))
    """
    names = {"layers", "kinds", "steps", "heads", "max_query_tokens", "batch_indices", "query_seed"}
    chosen = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    if chosen and kwargs.get("selection") is not None:
        raise ValueError("give either selection or selection keywords, not both")
    if chosen:
        kwargs["selection"] = Selection(**chosen)
    return TraceCapture(model, directory, **kwargs)


def capture_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    directory: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_inference_steps: int = 20,
    selection: Selection | None = None,
    dtype: torch.dtype | str | None = None,
    shard_bytes: int = 64 * 2**20,
    overwrite: bool = False,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_shard: Callable[[int, str], None] | None = None,
    metadata: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TraceCapture:
    """Run ``pipe`` on each prompt (prompt ``i`` with seed ``seed + i``) under one capture.

    Split across ``world_size`` processes, rank ``rank`` runs prompts ``i`` with ``i % world_size == rank``
    (same ids and seeds as a single-process run) into ``directory/rank-<rank>/``; once every rank is
    done, :func:`hopfield_aa.traces.merge_ranks` writes ``directory/manifest.json`` over all of them.

    Parameters
    ----------
    pipe : diffusers pipeline
        Called as ``pipe(prompt, num_inference_steps=..., generator=..., **pipeline_kwargs)``.
    prompts : sequence of str
        One run per prompt; its index is the record's ``prompt_id``.
    directory : str or Path
        The capture directory.
    seed : int, default 0
        Base seed; the generator of prompt ``i`` is seeded with ``seed + i``.
    num_inference_steps : int, default 20
        Denoising steps per run.
    selection, dtype, shard_bytes, overwrite, on_shard
        As for :class:`TraceCapture`.
    pipeline_kwargs : Mapping, optional
        Extra pipeline arguments (``guidance_scale``, ``height``, ``width``, ``output_type``).
    progress : bool, default True
        Show a progress bar over prompts (the pipeline shows its own over steps).
    metadata : Mapping, optional
        Extra JSON-serialisable run metadata for the manifest (e.g. the weights' identity); the prompts,
        seed, step count and scalar pipeline arguments are always recorded.
    rank, world_size : int, default 0 and 1
        This process's share of the prompts (see above); ``world_size=1`` writes into ``directory``.

    Returns
    -------
    TraceCapture
        The finished (stopped) capture.
    """
    from tqdm.auto import tqdm

    from hopfield_aa.traces.ranks import prepare_rank

    directory, prompt_ids, rank_info = prepare_rank(directory, len(prompts), rank, world_size, overwrite)
    extra = dict(pipeline_kwargs or {})
    cap = TraceCapture(
        pipe,
        directory,
        selection=selection,
        dtype=dtype,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        on_shard=on_shard,
        metadata={
            "prompts": list(prompts),
            "seed": seed,
            "num_inference_steps": num_inference_steps,
            "pipeline_kwargs": {k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool))},
            **rank_info,
            **dict(metadata or {}),
        },
        key_prefix=f"rank{rank}_" if world_size > 1 else "",
    )
    with cap:
        for prompt_id in tqdm(prompt_ids, desc="capture", unit="prompt", disable=not progress):
            prompt = prompts[prompt_id]
            run_seed = seed + prompt_id
            cap.begin_run(prompt_id=prompt_id, seed=run_seed, prompt=prompt, steps=num_inference_steps)
            generator = torch.Generator(device="cpu").manual_seed(run_seed)
            pipe(prompt, num_inference_steps=num_inference_steps, generator=generator, **extra)
    return cap
