"""Guidance processors on tiny diffusers models built from config: equivalence with the stock processors,
with manual dense/sparse attention, exact restoration, joint-attention blocks, half precision, selection."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from diffusers import DDIMScheduler, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from entmax import entmax15, entmax_bisect, sparsemax

from hopfield_aa.geometry import extrapolate, gag, ladder_extrapolate
from hopfield_aa.guidance import (
    RULES,
    GAGAttnProcessor,
    GuidanceConfig,
    attention_layers,
    disable_gag,
    enable_gag,
    gag_guidance,
    guidance_handle,
    register_rule,
)
from hopfield_aa.traces.testing import tiny_flux, tiny_sd3, tiny_unet

# (rule, enable_gag keyword arguments) with λ ≠ 0, covering every registered rule and the gag variants
RULE_CASES = [
    ("extrapolate", {"scale": 2.0}),
    ("extrapolate", {"scale": 1.5, "alpha": 2.0}),
    ("gag", {"scale": 1.5}),
    ("gag", {"scale": 0.8, "zeta": 0.5, "eta": 0.05}),
    ("gag", {"scale": 1.2, "zeta": 1.0, "eta": 0.0, "reference": "dense"}),
    ("ladder", {"scale": 2.0}),
]
RULE_IDS = [f"{rule}-{i}" for i, (rule, _) in enumerate(RULE_CASES)]


# ------------------------------------------------------------------------------------------ oracles


def oracle_entmax(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """α-entmax from the deep-spin ``entmax`` package, independent of hopfield_aa.normalizers."""
    if alpha == 1.0:
        return torch.softmax(scores, dim=-1)
    if alpha == 1.5:
        return entmax15(scores, dim=-1)
    if alpha == 2.0:
        return sparsemax(scores, dim=-1)
    return entmax_bisect(scores, alpha, dim=-1, n_iter=100)


def oracle_rule(rule: str, kwargs: dict, retrievals: list[torch.Tensor]) -> torch.Tensor:
    """The rule applied with the validated public geometry functions."""
    scale = kwargs["scale"]
    if rule == "extrapolate":
        return extrapolate(retrievals[0], retrievals[1], scale)
    if rule == "gag":
        options = {k: kwargs[k] for k in ("zeta", "eta", "reference") if k in kwargs}
        return gag(retrievals[0], retrievals[1], scale, **options)
    return ladder_extrapolate(retrievals, scale)


def atol_of(rule: str) -> float:
    # the ladder's least-squares Anderson step amplifies float32 rounding of the retrievals
    return 2e-4 if rule == "ladder" else 2e-5


def alphas_of(rule: str, kwargs: dict) -> tuple[float, ...]:
    if rule == "ladder":
        return (1.0, 1.25, 1.5, 2.0)
    return (1.0, kwargs.get("alpha", 1.5))


def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, n_heads, -1).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def manual_cross(attn: Attention, x: torch.Tensor, context: torch.Tensor, rule: str | None, kwargs: dict):
    """UNet cross-attention by hand: the rule of [entmax_α(βQKᵀ)V] (or dense attention for rule=None)."""
    q, k, v = (
        heads(attn.to_q(x), attn.heads),
        heads(attn.to_k(context), attn.heads),
        heads(attn.to_v(context), attn.heads),
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if rule is None:
        out = oracle_entmax(scores, 1.0) @ v
    else:
        out = oracle_rule(rule, kwargs, [oracle_entmax(scores, a) @ v for a in alphas_of(rule, kwargs)])
    return attn.to_out[0](merge(out))


def manual_joint(attn: Attention, x: torch.Tensor, context: torch.Tensor, rule: str | None, kwargs: dict):
    """SD3 joint attention by hand, from the explicit joint softmax split into its image and text blocks."""
    n_img = x.shape[1]
    q = torch.cat([heads(attn.to_q(x), attn.heads), heads(attn.add_q_proj(context), attn.heads)], dim=2)
    k = torch.cat([heads(attn.to_k(x), attn.heads), heads(attn.add_k_proj(context), attn.heads)], dim=2)
    v = torch.cat([heads(attn.to_v(x), attn.heads), heads(attn.add_v_proj(context), attn.heads)], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(scores, dim=-1)
    out = p @ v
    if rule is not None:
        z_txt, v_txt = scores[:, :, :n_img, n_img:], v[:, :, n_img:]
        image_block = p[:, :, :n_img, :n_img] @ v[:, :, :n_img]
        text_mass = p[:, :, :n_img, n_img:].sum(-1, keepdim=True)
        guided = oracle_rule(rule, kwargs, [oracle_entmax(z_txt, a) @ v_txt for a in alphas_of(rule, kwargs)])
        out = torch.cat([image_block + text_mass * guided, out[:, :, n_img:]], dim=2)
    out = merge(out)
    return attn.to_out[0](out[:, :n_img]), attn.to_add_out(out[:, n_img:])


# ------------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two threads on a shared 2-core machine thrash)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def sd3() -> SD3Transformer2DModel:
    return tiny_sd3(joint_attention_dim=16, pooled_projection_dim=8, qk_norm=None)


@pytest.fixture(scope="module")
def flux() -> FluxTransformer2DModel:
    return tiny_flux(in_channels=4, joint_attention_dim=16, pooled_projection_dim=8)


def cross_attention_module() -> Attention:
    torch.manual_seed(1)
    return Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()


def unet_inputs(batch: int = 2, cfg: bool = False) -> dict:
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(batch // 2 if cfg else batch, 3, 8, 8, generator=g)
    if cfg:
        sample = torch.cat([sample, sample])
    return {
        "sample": sample,
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=g),
    }


def sd3_inputs(dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g).to(dtype),
        "pooled_projections": torch.randn(2, 8, generator=g).to(dtype),
        "timestep": torch.tensor([500.0, 500.0]),
    }


def flux_inputs() -> dict:
    g = torch.Generator().manual_seed(4)
    img_ids = torch.stack([torch.zeros(16), torch.arange(16.0) // 4, torch.arange(16.0) % 4], dim=1)
    return {
        "hidden_states": torch.randn(2, 16, 4, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
        "pooled_projections": torch.randn(2, 8, generator=g),
        "timestep": torch.tensor([0.5, 0.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(5, 3),
    }


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("which", ["unet", "sd3", "flux"])
def test_extrapolate_at_zero_scale_reproduces_the_stock_processor(which, request):
    model = request.getfixturevalue(which)
    inputs = {"unet": unet_inputs, "sd3": sd3_inputs, "flux": flux_inputs}[which]()
    stock = run(model, inputs)
    with gag_guidance(model, "extrapolate", scale=0.0) as handle:
        assert handle.layers, "no layer guided"
        guided = run(model, inputs)
    torch.testing.assert_close(guided, stock, rtol=1e-5, atol=1e-5)


def test_gag_at_zero_scale_is_exactly_sparse_cross_attention():
    attn = cross_attention_module()
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 7, 16, generator=g), torch.randn(2, 5, 8, generator=g)
    with torch.no_grad():
        expected = manual_cross(attn, x, context, "extrapolate", {"scale": 1.0})  # D + 1 (S - D) = S
        sparse_by_hand = attn.to_out[0](
            merge(
                oracle_entmax(
                    heads(attn.to_q(x), 2) @ heads(attn.to_k(context), 2).transpose(-1, -2) / math.sqrt(8),
                    1.5,
                )
                @ heads(attn.to_v(context), 2)
            )
        )
        with gag_guidance(attn, "gag", scale=0.0):
            out = attn(x, encoder_hidden_states=context)
    torch.testing.assert_close(out, sparse_by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    stock = attn(x, encoder_hidden_states=context)
    assert (out - stock).abs().max() > 1e-3, "sparse attention should differ from dense attention here"


@pytest.mark.parametrize(("rule", "kwargs"), RULE_CASES, ids=RULE_IDS)
def test_every_rule_equals_the_rule_of_manual_dense_and_sparse_cross_attention(rule, kwargs):
    attn = cross_attention_module()
    g = torch.Generator().manual_seed(6)
    x, context = torch.randn(2, 9, 16, generator=g), torch.randn(2, 6, 8, generator=g)
    with torch.no_grad():
        expected = manual_cross(attn, x, context, rule, kwargs)
        with gag_guidance(attn, rule, **kwargs):
            out = attn(x, encoder_hidden_states=context)
        stock = attn(x, encoder_hidden_states=context)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=atol_of(rule))
    assert (out - stock).abs().max() > 1e-4, "a rule with λ ≠ 0 should change the output"


@pytest.mark.parametrize(("rule", "kwargs"), RULE_CASES, ids=RULE_IDS)
def test_every_rule_equals_the_rule_of_manual_joint_attention_blocks(sd3, rule, kwargs):
    attn = sd3.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn(2, 16, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        expected_img, expected_txt = manual_joint(attn, x, context, rule, kwargs)
        stock_img, stock_txt = attn(x, encoder_hidden_states=context)
        with gag_guidance(attn, rule, **kwargs):
            out_img, out_txt = attn(x, encoder_hidden_states=context)
    torch.testing.assert_close(out_img, expected_img, rtol=1e-4, atol=atol_of(rule))
    torch.testing.assert_close(out_txt, expected_txt, rtol=1e-4, atol=2e-5)
    # the text stream is the stock one, the image stream is guided
    torch.testing.assert_close(out_txt, stock_txt, rtol=1e-5, atol=1e-6)
    assert (out_img - stock_img).abs().max() > 1e-4


def test_joint_attention_leaves_the_image_to_image_block_and_text_stream_untouched(sd3):
    """With identity projections the output minus m·G_txt is the stock image→image block, exactly."""
    attn = sd3.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 16, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    n_img = x.shape[1]
    with torch.no_grad():
        q = torch.cat([heads(attn.to_q(x), 2), heads(attn.add_q_proj(context), 2)], dim=2)
        k = torch.cat([heads(attn.to_k(x), 2), heads(attn.add_k_proj(context), 2)], dim=2)
        v = torch.cat([heads(attn.to_v(x), 2), heads(attn.add_v_proj(context), 2)], dim=2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        image_block = merge(p[:, :, :n_img, :n_img] @ v[:, :, :n_img])
        text_mass = p[:, :, :n_img, n_img:].sum(-1, keepdim=True)
        z_txt = (q @ k.transpose(-1, -2) / math.sqrt(8))[:, :, :n_img, n_img:]
        sparse_txt = entmax15(z_txt, dim=-1) @ v[:, :, n_img:]
        w = attn.to_out[0].weight
        with gag_guidance(attn, "gag", scale=0.0):  # G_txt = S_txt
            out_img, out_txt = attn(x, encoder_hidden_states=context)
        _, stock_txt = attn(x, encoder_hidden_states=context)
    # undo the output projection (square, invertible for this seed) to read the attention output
    attention_out = torch.linalg.solve(w, (out_img - attn.to_out[0].bias).transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(
        attention_out - merge(text_mass * sparse_txt), image_block, rtol=1e-4, atol=1e-5
    )
    assert torch.equal(out_txt, stock_txt) or torch.allclose(out_txt, stock_txt, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", ["unet", "sd3", "flux"])
def test_disable_restores_the_original_processor_objects_and_bit_identical_outputs(which, request):
    model = request.getfixturevalue(which)
    inputs = {"unet": unet_inputs, "sd3": sd3_inputs, "flux": flux_inputs}[which]()
    before = dict(model.attn_processors)
    stock = run(model, inputs)
    handle = enable_gag(model, "gag", scale=2.0)
    assert guidance_handle(model) is handle
    guided = run(model, inputs)
    assert not torch.allclose(guided, stock)
    assert disable_gag(model) is True
    assert disable_gag(model) is False  # already off
    after = dict(model.attn_processors)
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert torch.equal(run(model, inputs), stock)
    assert guidance_handle(model) is None


def test_flux_single_stream_blocks_are_guided_with_the_text_length_of_the_call(flux):
    inputs = flux_inputs()
    stock = run(flux, inputs)
    with gag_guidance(flux, "gag", scale=2.0, layers="single_transformer_blocks.*") as handle:
        assert handle.layers == ["single_transformer_blocks.0.attn"]
        guided = run(flux, inputs)
        assert handle.text_tokens == 5
    assert (guided - stock).abs().max() > 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", ["gag", "extrapolate", "ladder"])
def test_half_precision_runs_without_nan_and_stays_near_float32(unet, sd3, dtype, rule):
    for model, inputs in ((unet, unet_inputs()), (sd3, sd3_inputs())):
        with gag_guidance(model, rule):
            reference = run(model, inputs)
            model.to(dtype)
            try:
                half_inputs = {
                    k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v
                    for k, v in inputs.items()
                }
                out = run(model, half_inputs)
            finally:
                model.to(torch.float32)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


def test_default_selection_is_every_cross_attention_layer_and_patterns_select_by_name(unet):
    kinds = attention_layers(unet)
    cross = sorted(name for name, kind in kinds.items() if kind == "cross")
    with gag_guidance(unet) as handle:
        assert sorted(handle.layers) == cross
        processors = unet.attn_processors
        for name, kind in kinds.items():
            guided = isinstance(processors[f"{name}.processor"], GAGAttnProcessor)
            assert guided == (kind == "cross"), name
    with gag_guidance(unet, layers=["down_blocks.*attn2", "mid_block.*.attn1"]) as handle:
        assert handle.layers == [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
            "mid_block.attentions.0.transformer_blocks.0.attn1",
        ]
        processors = unet.attn_processors
        guided = {n[: -len(".processor")] for n, p in processors.items() if isinstance(p, GAGAttnProcessor)}
        assert guided == set(handle.layers)
    with pytest.raises(ValueError, match="matches no attention layer"):
        enable_gag(unet, layers=["nothing.*"])
    assert guidance_handle(unet) is None


@pytest.fixture
def probe():
    """A registered rule that records the batch size of each call and returns the dense retrieval."""
    calls: list[int] = []

    def probe_rule(retrievals, scale):
        """Record the call, return the dense retrieval."""
        calls.append(retrievals[0].shape[0])
        return retrievals[0]

    register_rule("probe", probe_rule, alphas=(1.0, 1.5), scale=1.0)
    yield calls
    RULES.pop("probe")


def test_step_fraction_and_timestep_windows_guide_only_inside_the_window(unet, probe):
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    n_cross = sum(kind == "cross" for kind in attention_layers(unet).values())
    inputs = unet_inputs()

    def calls_per_step(**window) -> list[int]:
        counts = []
        with gag_guidance(unet, "probe", scheduler=scheduler, **window):
            for _ in range(2):  # two sampling runs: the step count restarts with the second
                for t in scheduler.timesteps:
                    before = len(probe)
                    run(unet, {**inputs, "timestep": t})
                    counts.append((len(probe) - before) // n_cross)
        return counts

    assert calls_per_step(steps=(0.0, 0.5)) == [1, 1, 0, 0] * 2
    assert calls_per_step(steps=(0.5, 1.0)) == [0, 0, 1, 1] * 2
    low = float(scheduler.timesteps[2])
    assert calls_per_step(timesteps=(0.0, low)) == [0, 0, 1, 1] * 2
    with pytest.raises(ValueError, match="scheduler"):
        enable_gag(unet, steps=(0.0, 0.5))


def test_cond_only_guides_the_conditional_half_of_a_cfg_batch(unet, probe):
    cfg_inputs = unet_inputs(batch=4, cfg=True)
    with gag_guidance(unet, "probe", apply_to="cond"):
        run(unet, cfg_inputs)
    assert set(probe) == {2}  # the [uncond, cond] batch of 4: the rule sees the 2 conditional rows
    probe.clear()
    with gag_guidance(unet, "probe", apply_to="cond"):
        run(unet, unet_inputs(batch=4))  # different latents: not a CFG batch, all rows are conditional
    assert set(probe) == {4}
    probe.clear()
    with gag_guidance(unet, "probe", apply_to="both"):
        run(unet, cfg_inputs)
    assert set(probe) == {4}
    probe.clear()
    with gag_guidance(unet, "probe", apply_to="cond", cfg_batch=False):
        run(unet, cfg_inputs)
    assert set(probe) == {4}

    # with a real rule the unconditional half keeps dense attention and the conditional half changes
    stock = run(unet, cfg_inputs)
    with gag_guidance(unet, "gag", scale=2.0, apply_to="cond"):
        guided = run(unet, cfg_inputs)
    torch.testing.assert_close(guided[:2], stock[:2], rtol=1e-5, atol=1e-5)
    assert (guided[2:] - stock[2:]).abs().max() > 1e-4


def test_a_registered_rule_is_used_by_name(unet):
    def negate_residual(retrievals, scale, *, shift=0.0):
        """D - λ (S - D) + shift."""
        dense, sparse = retrievals
        return dense - scale * (sparse - dense) + shift

    register_rule("negate", negate_residual, alphas=(1.0, 2.0), scale=1.0)
    try:
        attn = cross_attention_module()
        g = torch.Generator().manual_seed(9)
        x, context = torch.randn(1, 4, 16, generator=g), torch.randn(1, 3, 8, generator=g)
        with torch.no_grad(), gag_guidance(attn, "negate", scale=0.5, shift=0.25):
            out = attn(x, encoder_hidden_states=context)
        expected = (
            manual_cross(attn, x, context, "extrapolate", {"scale": -0.5, "alpha": 2.0})
            + attn.to_out[0].weight.sum(-1) * 0.25
        )
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="no option"):
            enable_gag(attn, "negate", zeta=1.0)
    finally:
        RULES.pop("negate")


def test_bad_arguments_are_rejected_with_the_argument_named(unet):
    with pytest.raises(ValueError, match="rule must be one of"):
        enable_gag(unet, "nope")
    with pytest.raises(ValueError, match="eta"):
        enable_gag(unet, eta=-1.0)
    with pytest.raises(ValueError, match="reference"):
        enable_gag(unet, reference="update")
    with pytest.raises(ValueError, match="alpha"):
        enable_gag(unet, alpha=0.5)
    with pytest.raises(ValueError, match="apply_to"):
        enable_gag(unet, apply_to="uncond")
    with pytest.raises(ValueError, match="alphas"):
        enable_gag(unet, "ladder", alphas=(1.0, 2.0, 1.5))
    with pytest.raises(ValueError, match="steps"):
        enable_gag(unet, steps=(0.8, 0.2), scheduler=DDIMScheduler())
    with enable_gag(unet), pytest.raises(RuntimeError, match="already enabled"):
        enable_gag(unet)
    assert guidance_handle(unet) is None
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


# ------------------------------------------------------------------------------- α per layer and head


def test_per_head_alpha_gives_each_head_its_own_sparse_retrieval():
    """gag at λ = 0 is the sparse retrieval S; with α per head, head h is entmax_{α_h}(βQKᵀ)V."""
    attn = cross_attention_module()
    g = torch.Generator().manual_seed(6)
    x, context = torch.randn(2, 7, 16, generator=g), torch.randn(2, 5, 8, generator=g)
    alphas = (1.3, 2.0)
    with torch.no_grad():
        q, k, v = heads(attn.to_q(x), 2), heads(attn.to_k(context), 2), heads(attn.to_v(context), 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        per_head = torch.stack([oracle_entmax(scores[:, h], a) @ v[:, h] for h, a in enumerate(alphas)], 1)
        expected = attn.to_out[0](merge(per_head))
        for alpha in (list(alphas), torch.tensor(alphas), {"*": alphas}):
            with gag_guidance(attn, "gag", scale=0.0, alpha=alpha) as handle:
                out = attn(x, encoder_hidden_states=context)
                layer = handle.layers[0]
                assert handle.alphas_for(layer)[1].flatten().tolist() == pytest.approx(alphas)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_per_layer_alpha_mapping_matches_guiding_each_layer_with_its_alpha(unet):
    inputs = unet_inputs()
    layers = [name for name, kind in attention_layers(unet).items() if kind == "cross"]
    assert len(layers) >= 2
    with gag_guidance(unet, "extrapolate", scale=2.0, alpha=2.0):
        uniform = run(unet, inputs)
    # every layer at α = 2 through the mapping: the same as alpha=2.0
    with gag_guidance(unet, "extrapolate", scale=2.0, alpha={name: 2.0 for name in layers}) as handle:
        mapped = run(unet, inputs)
        assert all(handle.alphas_for(name) == (1.0, 2.0) for name in layers)
    torch.testing.assert_close(mapped, uniform, rtol=1e-6, atol=1e-6)
    # one layer at α = 2, the rest at the default 1.5: first matching pattern wins
    with gag_guidance(unet, "extrapolate", scale=2.0, alpha={layers[0]: 2.0, "*": 1.5}) as handle:
        mixed = run(unet, inputs)
        assert handle.alphas_for(layers[0]) == (1.0, 2.0)
        assert handle.alphas_for(layers[1]) == (1.0, 1.5)
    with gag_guidance(unet, "extrapolate", scale=2.0):
        default = run(unet, inputs)
    assert not torch.allclose(mixed, uniform) and not torch.allclose(mixed, default)


def test_layer_alphas_errors_are_named(unet):
    with pytest.raises(ValueError, match="match no guided layer"):
        enable_gag(unet, alpha={"no.such.layer": 2.0})
    assert guidance_handle(unet) is None  # nothing left installed
    with pytest.raises(ValueError, match=r"has 3 α values but layer .* has 2 heads|heads"):
        enable_gag(cross_attention_module(), alpha=[1.5, 1.5, 1.5])
    with pytest.raises(ValueError, match=r"layer_alphas\['\*'\].*alpha must be >= 1"):
        enable_gag(unet, alpha={"*": 0.5})
    with pytest.raises(ValueError, match=r"layer_alphas\['\*'\]"):
        enable_gag(unet, alpha=[1.5, 0.9])
    with pytest.raises(ValueError, match="layer_alphas sets the one sparse retrieval"):
        GuidanceConfig(rule="ladder", layer_alphas={"*": 1.5})
    with pytest.raises(TypeError, match="layer_alphas must be a mapping"):
        GuidanceConfig(layer_alphas=[1.5])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ fused attention


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_lean_default_gag_kernel_equals_the_public_gag_including_a_zero_reference(
    native, dtype, monkeypatch
):
    """Both forms of the lean kernel (one native call on CPU, the tensor ops elsewhere), on contiguous and
    strided retrievals; exactly S where the reference is zero or negligible or r = 0."""
    from hopfield_aa import _jit
    from hopfield_aa.guidance import rules
    from hopfield_aa.guidance.rules import gag_parallel, gag_rule

    monkeypatch.setattr(_jit, "_enabled", native)
    calls = []
    kernel = rules._gag_parallel_native
    monkeypatch.setattr(rules, "_gag_parallel_native", lambda *a: calls.append(1) or kernel(*a))
    g = torch.Generator().manual_seed(11)
    dense = torch.randn(2, 3, 20, 8, generator=g, dtype=dtype)
    sparse = torch.randn(2, 3, 20, 8, generator=g, dtype=dtype)
    sparse[0, 0, 0] = 0.0  # no reference direction: no parallel part, G = S
    tiny = 1e-9 if dtype == torch.float32 else 1e-20
    sparse[0, 0, 1] = tiny * sparse[0, 0, 1]  # negligible against |r|_∞
    dense[0, 0, 2] = sparse[0, 0, 2]  # r = 0
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for d, s in ((dense, sparse), (dense.transpose(1, 2), sparse.transpose(1, 2))):
        for scale in (0.0, 1.0, 2.5):
            expected = gag(d, s, scale)
            torch.testing.assert_close(gag_parallel(d, s, scale), expected, rtol=tol, atol=tol)
            torch.testing.assert_close(gag_rule([d, s], scale), expected, rtol=tol, atol=tol)
    for scale in (0.0, 1.0, 2.5):
        assert torch.equal(gag_parallel(dense, sparse, scale)[0, 0, :3], sparse[0, 0, :3])
    assert bool(calls) == native


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_native_gag_kernel_lays_out_a_4d_result_as_the_stock_attention_so_merging_heads_copies_nothing(
    dtype,
):
    """On CPU the default rule's (batch, heads, queries, d) result lies in memory as (batch, queries, heads,
    d), as ``F.scaled_dot_product_attention``'s output does for a processor's Q, K, V, so the processor's
    merge of the heads (``transpose(1, 2).reshape``) is a view of it; its values are the tensor form's; a
    result of another rank stays contiguous."""
    import torch.nn.functional as F

    from hopfield_aa import _jit
    from hopfield_aa.guidance.rules import gag_parallel

    g = torch.Generator().manual_seed(14)
    dense = torch.randn(2, 3, 20, 8, generator=g, dtype=dtype)
    sparse = torch.randn(2, 3, 20, 8, generator=g, dtype=dtype)
    out = gag_parallel(dense, sparse, 1.5)
    # a processor's Q, K, V: views of (batch, tokens, heads, d) projections
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (dense, sparse, sparse))
    stock = F.scaled_dot_product_attention(q, k, v)
    assert out.stride() == stock.stride() == (20 * 3 * 8, 8, 3 * 8, 1)
    merged = out.transpose(1, 2).reshape(2, 20, 3 * 8)
    assert merged._is_view() and merged.data_ptr() == out.data_ptr()
    with _jit.disabled():
        expected = gag_parallel(dense, sparse, 1.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    rows = gag_parallel(dense.reshape(-1, 8), sparse.reshape(-1, 8), 1.5)
    assert rows.is_contiguous()
    torch.testing.assert_close(rows, expected.reshape(-1, 8), rtol=tol, atol=tol)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_lean_default_gag_kernel_never_turns_a_nan_retrieval_into_a_finite_row(
    native, dtype, monkeypatch
):
    """A NaN in the dense or the sparse retrieval of a head and query token makes that row of the rule NaN
    (both forms: the native kernel's integer maximum of |r| gives a NaN bound there, which must not
    read as a negligible reference); the other rows are the finite rule."""
    from hopfield_aa import _jit
    from hopfield_aa.guidance.rules import gag_parallel

    monkeypatch.setattr(_jit, "_enabled", native)
    g = torch.Generator().manual_seed(13)
    dense = torch.randn(2, 3, 5, 8, generator=g, dtype=dtype)
    sparse = torch.randn(2, 3, 5, 8, generator=g, dtype=dtype)
    dense[0, 0, 0, 3] = math.nan
    sparse[1, 2, 4, 0] = math.nan
    out = gag_parallel(dense, sparse, 2.0)
    assert bool(out[0, 0, 0].isnan().all()) and bool(out[1, 2, 4].isnan().all())
    assert int(out.isnan().any(-1).sum()) == 2


@pytest.mark.parametrize("batch", [1, 16])
def test_guided_attention_equals_the_rules_of_explicit_retrievals_on_short_and_long_rows(batch):
    """Both entmax kernels the fused routine picks (sort on few entries, the support passes on many)."""
    from hopfield_aa.guidance.attention import guided_attention

    g = torch.Generator().manual_seed(12)
    for n_queries, n_keys in ((16, 12), (64, 77)):
        q = torch.randn(batch, 4, n_queries, 16, generator=g)
        k, v = torch.randn(batch, 4, n_keys, 16, generator=g), torch.randn(batch, 4, n_keys, 16, generator=g)
        scores = q @ k.transpose(-1, -2) / 4.0
        for rule, kwargs in RULE_CASES:
            spec = RULES[rule]
            options = {**spec.options, **{key: kwargs[key] for key in spec.options if key in kwargs}}
            alphas = alphas_of(rule, kwargs)
            expected = oracle_rule(rule, kwargs, [oracle_entmax(scores, a) @ v for a in alphas])
            out = guided_attention(
                q,
                k,
                v,
                lambda r, f=spec.function, o=options, s=kwargs["scale"]: f(r, s, **o),
                alphas,
                scale=0.25,
            )
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=atol_of(rule))


def test_guided_attention_on_some_rows_leaves_the_others_to_the_stock_kernel():
    from hopfield_aa.guidance.attention import guided_attention

    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(4, 2, n, 8, generator=g) for n in (10, 6, 6))
    stock = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = guided_attention(q, k, v, lambda r: r[1], (1.0, 1.5), scale=8**-0.5, rows=slice(2, 4))
    assert torch.equal(out[:2], stock[:2])
    torch.testing.assert_close(out[2:], entmax15(q[2:] @ k[2:].transpose(-1, -2) / 8**0.5, dim=-1) @ v[2:])


def _guided_peak(rule: str, native: bool, in_kernel: bool = False) -> tuple[int, int, int, int]:
    """Peak bytes of one guided call of ``rule`` (native kernels on or off) at (1, 4, 8192, 77, 4), with
    the bytes of one score matrix, of one output and of entmax's row block (torch.profiler's memory
    events)."""
    import sys
    from pathlib import Path

    from hopfield_aa import _jit
    from hopfield_aa.guidance.attention import guided_attention
    from hopfield_aa.guidance.rules import get_rule, row_rule
    from hopfield_aa.normalizers import blocked

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))
    import _bench

    batch, heads, queries, keys, dim = 1, 4, 8192, 77, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for n in (queries, keys, keys))
    rule_spec = get_rule(rule)
    combine = lambda retrievals: rule_spec.function(retrievals, rule_spec.scale)  # noqa: E731
    form = row_rule(rule_spec.function, rule_spec.scale, rule_spec.options) if in_kernel else None
    score_bytes = batch * heads * queries * keys * 4
    output_bytes = batch * heads * queries * dim * 4
    block_bytes = min(blocked._BLOCK_ELEMENTS // keys * keys, heads * queries * keys) * 4
    with torch.no_grad(), contextlib.nullcontext() if native else _jit.disabled():
        peak = _bench.peak_allocated(
            lambda: guided_attention(q, k, v, combine, rule_spec.alphas, scale=dim**-0.5, row_rule=form)
        )
    return peak, score_bytes, output_bytes, block_bytes


@pytest.mark.parametrize("rule", ["gag", "extrapolate"])
def test_guided_attention_keeps_at_most_two_score_sized_buffers_alive(rule):
    """On the tensor path (native kernels off) one guided call holds the scores and one probability
    matrix at a time, plus entmax's buffers of one row block (2^20 entries at most: its scratch, and the
    rows still unsettled after the fixed passes) and tensors of the output's size: its peak memory stays
    below 2 score buffers + 2 blocks + 6 outputs. At this shape the bound leaves about 2.5 MB of room and
    a third score-sized buffer would be 10 MB."""
    peak, score_bytes, output_bytes, block_bytes = _guided_peak(rule, native=False)
    assert score_bytes < peak <= 2 * score_bytes + 2 * block_bytes + 6 * output_bytes


@pytest.mark.parametrize("rule", ["gag", "extrapolate"])
def test_the_fused_guided_call_allocates_no_score_sized_buffer(rule):
    """With the native kernels on, both retrievals come from one fused call that never stores the
    scores (:mod:`hopfield_aa.guidance.fused`): the call's peak is a few output-sized tensors (the two
    retrievals, the rule's result and its temporaries), below one score matrix (here 19× an output)."""
    peak, score_bytes, output_bytes, _ = _guided_peak(rule, native=True)
    assert peak <= 4 * output_bytes < score_bytes


@pytest.mark.parametrize("rule", ["gag", "extrapolate"])
def test_with_the_rule_inside_the_fused_kernel_a_guided_call_allocates_its_output_alone(rule):
    """With the rule's row form (``row_rule``, as the processors pass it) the kernel computes the rule as
    well and stores no retrieval: the call's peak is its output, as stock attention's."""
    peak, _, output_bytes, _ = _guided_peak(rule, native=True, in_kernel=True)
    assert peak == output_bytes
