"""Tests of dig.py: the DiG / DiT models, the diffusion maths and sampling (CPU, fast)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dig


def tiny_dig(**kwargs):
    args = dict(depth=4, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=10)
    return dig.DiG(**{**args, **kwargs})


def tiny_dit(**kwargs):
    args = dict(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=10)
    return dig.DiT(**{**args, **kwargs})


def randomize_(model, std=0.1, seed=0):
    """Give the zero-initialised parts (adaLN, final layer) random values, so outputs are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(model, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, model.num_classes, (n,), generator=gen)
    return x, t, y


# ---------------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("cls", [tiny_dig, tiny_dit])
@pytest.mark.parametrize("input_size,patch,channels,learn_sigma", [
    (8, 2, 4, True), (16, 4, 3, False), (16, 8, 1, True), (12, 2, 4, True)])
def test_output_shapes(cls, input_size, patch, channels, learn_sigma):
    model = cls(input_size=input_size, patch_size=patch, in_channels=channels, learn_sigma=learn_sigma)
    x, t, y = inputs(model, n=2)
    out = model(x, t, y)
    assert out.shape == (2, channels * (2 if learn_sigma else 1), input_size, input_size)
    assert model.out_channels == out.shape[1] and model.patch_size == patch and model.input_size == input_size


@pytest.mark.parametrize("cls", [tiny_dig, tiny_dit])
def test_output_is_exactly_zero_at_init(cls):
    model = cls()
    out = model(*inputs(model))
    assert torch.equal(out, torch.zeros_like(out))


def test_dig_blocks_are_identity_at_init():
    # Zero gates (adaLN-Zero), identity depthwise convs and a scan order of period 4: the trunk is the identity.
    model = tiny_dig(depth=8, input_size=12)
    x = torch.randn(2, model.grid_size ** 2, 64)
    c = torch.randn(2, 64)
    assert torch.equal(model.run_blocks(x, c), x)


def test_scan_order_visits_four_directions_and_returns_to_raster():
    side = 5
    ids = torch.arange(side * side).view(1, -1, 1)          # token ids in raster order
    grid = torch.arange(side * side).view(side, side)
    expected = [grid.flatten(), grid.flatten().flip(0), grid.t().flatten(), grid.t().flatten().flip(0)]
    x = ids
    for i in range(8):
        assert torch.equal(x.flatten(), expected[i % 4]), f"block {i} sees the wrong order"
        x = dig.reorient(x, i, side)
    assert torch.equal(x, ids)


def test_reorient_moves_whole_tokens():
    # Whole feature vectors move together; nothing is mixed across channels.
    x = torch.randn(2, 16, 3)
    y = dig.reorient(x, 1, 4)
    assert torch.equal(y.sort(dim=1).values, x.sort(dim=1).values)
    assert torch.equal(y[:, 0], x[:, -1])


def test_dwconv_is_identity_at_init_and_works_on_the_grid():
    conv = dig.DepthwiseConv(dim=3, side=4)
    x = torch.randn(2, 16, 3)
    assert torch.equal(conv(x), x)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[:, :, 0, 1] = 1                     # output (r, c) = input (r - 1, c): the token above
    out = conv(x).view(2, 4, 4, 3)
    grid = x.view(2, 4, 4, 3)
    assert torch.equal(out[:, 1:], grid[:, :-1]) and torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


def test_gla_mixer_is_causal_in_scan_order():
    torch.manual_seed(0)
    mixer = dig.GatedLinearAttention(dim=32, num_heads=2)
    x = torch.randn(2, 20, 32)
    x2 = x.clone()
    x2[:, 11] += 1.0
    diff = (mixer(x2) - mixer(x)).abs().amax(dim=(0, 2))
    assert torch.all(diff[:11] == 0) and torch.all(diff[11:] > 0)


def test_gla_mixer_matches_a_direct_recurrence():
    # An independent implementation of the GLA layer from its definition (token by token, float64).
    torch.manual_seed(0)
    m = dig.GatedLinearAttention(dim=32, num_heads=2).double()
    with torch.no_grad():
        m.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    H, K, V = 2, 8, 16
    q, k, v = m.q(x).view(2, 9, H, K), m.k(x).view(2, 9, H, K), m.v(x).view(2, 9, H, V)
    g = F.logsigmoid(m.forget_gate(x)).view(2, 9, H, K) / 16
    S = torch.zeros(2, H, K, V, dtype=torch.float64)
    outs = []
    for t in range(9):
        S = g[:, t, :, :, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o = torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S)
        o = o / o.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * m.norm_weight
        outs.append(o * F.silu(m.out_gate(x[:, t]).view(2, H, V)))
    expected = m.proj(torch.stack(outs, 1).flatten(2))
    torch.testing.assert_close(m(x), expected)


def test_swiglu_hidden_sizes():
    for dim, hidden in [(384, 1024), (768, 2048), (1024, 2816), (1152, 3072)]:
        assert dig.SwiGLU(dim).down.in_features == hidden


def test_dit_attention_variants_agree():
    torch.manual_seed(0)
    sdpa = randomize_(tiny_dit(attention="sdpa"))
    mat = tiny_dit(attention="materialized")
    mat.load_state_dict(sdpa.state_dict())
    x, t, y = inputs(sdpa)
    out = sdpa(x, t, y)
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(mat(x, t, y), out, atol=1e-5, rtol=1e-4)


SPEC_PARAMS = {"DiG-S/2": 33.1e6, "DiG-B/2": 130.8e6, "DiG-L/2": 465e6, "DiG-XL/2": 676e6,
               "DiT-S/2": 33.0e6, "DiT-B/2": 130.5e6, "DiT-L/2": 458e6, "DiT-XL/2": 675e6}


@pytest.mark.parametrize("name", SPEC_PARAMS)
def test_parameter_counts(name):
    registry = dig.DiG_models if name.startswith("DiG") else dig.DiT_models
    with torch.device("meta"):
        model = registry[name](input_size=32, in_channels=4, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / SPEC_PARAMS[name] - 1) < 0.01, f"{name}: {count / 1e6:.2f}M"


def test_named_configs():
    assert len(dig.DiG_models) == 12 and len(dig.DiT_models) == 12
    with torch.device("meta"):
        m = dig.DiG_models["DiG-B/4"](input_size=64, num_classes=10, learn_sigma=False)
    assert (m.patch_size, m.input_size, m.num_classes, m.out_channels, len(m.blocks)) == (4, 64, 10, 4, 12)


def test_bad_inputs_raise_clear_errors():
    model = tiny_dig()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(3, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(3, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="labels"):
        model(x, t, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="labels"):
        model(x, t, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_dig(depth=6)
    with pytest.raises(ValueError, match="divide"):
        tiny_dig(input_size=10, patch_size=4)
    with pytest.raises(ValueError, match="attention"):
        tiny_dit(attention="flash")
    model(x, t, torch.full((3,), 10))        # the null label is a valid input


def test_label_dropout():
    model = tiny_dig(class_dropout_prob=0.5)
    emb = model.y_embedder
    labels = torch.zeros(1000, dtype=torch.long)
    null = emb.embedding_table.weight[10]
    model.eval()
    assert not (emb(labels) == null).all(dim=1).any()
    model.train()
    dropped = (emb(labels) == null).all(dim=1).float().mean()
    assert 0.4 < dropped < 0.6
    forced = emb(torch.tensor([1, 2]), force_drop_ids=torch.tensor([1, 0]))
    assert torch.equal(forced[0], null) and torch.equal(forced[1], emb.embedding_table.weight[2])


def test_forward_with_cfg():
    model = randomize_(tiny_dig()).eval()
    x, t, y = inputs(model, n=2)
    null = torch.full_like(y, model.num_classes)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    cond, uncond = model(x, t, y), model(x, t, null)
    C = model.in_channels
    for scale in (1.0, 0.0, 4.0):
        out = model.forward_with_cfg(xx, tt, yy, scale)
        guided = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])   # all channels of eps are guided
        torch.testing.assert_close(out[:2, :C], guided, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[2:, :C], guided, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[:, C:], torch.cat([cond, uncond])[:, C:], atol=1e-5, rtol=1e-4)


def test_every_parameter_gets_gradient_after_a_step():
    torch.manual_seed(0)
    model = tiny_dig()
    diffusion = dig.create_diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, _, y = inputs(model, n=4)
    t = torch.tensor([0, 10, 500, 999])
    # Zero-initialised layers pass no gradient on: step 1 moves only the final Linear, step 2 the adaLN
    # layers, and from step 3 on every parameter learns.
    for _ in range(3):
        opt.zero_grad()
        diffusion.training_losses(model, x, t, {"y": y})["loss"].mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        if name == "pos_embed":
            assert p.grad is None and not p.requires_grad
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_small_dig_overfits_one_batch():
    # Fixed batch, fixed steps and fixed noise: memorising eps must drive the MSE far below its initial 1.
    torch.manual_seed(0)
    model = tiny_dig(input_size=8, class_dropout_prob=0.0)
    diffusion = dig.create_diffusion()
    x, _, y = inputs(model, n=8)
    t = torch.randint(0, 1000, (8,))
    noise = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    mses = []
    for _ in range(150):
        losses = diffusion.training_losses(model, x, t, {"y": y}, noise=noise)
        opt.zero_grad()
        losses["loss"].mean().backward()
        opt.step()
        mses.append(losses["mse"].mean().item())
    assert mses[0] == pytest.approx(1.0, abs=0.3)           # the model outputs 0 at init: MSE = E[noise^2]
    assert mses[-1] < mses[0] / 100, f"MSE {mses[0]:.3f} -> {mses[-1]:.3f}"


def test_train_step_closure_runs_under_bf16_autocast():
    model = tiny_dig()
    before = [p.detach().clone() for p in model.parameters()]
    step = dig.make_train_step(model, batch=2, device=torch.device("cpu"))
    step()
    step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Diffusion maths


@pytest.fixture(scope="module")
def diffusion():
    return dig.create_diffusion()


def test_schedule(diffusion):
    assert diffusion.num_timesteps == 1000
    assert diffusion.betas[0] == pytest.approx(1e-4) and diffusion.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(diffusion.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))


def test_q_sample_matches_closed_form(diffusion):
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 1, 400, 999])
    noise = torch.randn_like(x0)
    abar = torch.tensor(diffusion.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    # Empirically: mean sqrt(abar) x0 and variance 1 - abar.
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = diffusion.q_sample(x0, t)
    abar = diffusion.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)


def test_posterior_matches_bayes_rule(diffusion):
    # q(x_{t-1} | x_t, x_0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x_0): product of two Gaussians in x_{t-1}.
    torch.manual_seed(0)
    t = torch.tensor([1, 2, 50, 500, 999])
    x0, xt = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    beta = torch.tensor(diffusion.betas[t.numpy()]).view(-1, 1, 1, 1)
    abar_prev = torch.tensor(np.cumprod(1 - diffusion.betas)[t.numpy() - 1]).view(-1, 1, 1, 1)
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    expected_mean = ((1 - beta).sqrt() * xt / beta + abar_prev.sqrt() * x0 / (1 - abar_prev)) / precision
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double().expand_as(mean), (1 / precision).expand_as(mean), rtol=1e-5, atol=0)
    torch.testing.assert_close(log_var.exp().double(), 1 / precision, rtol=1e-5, atol=0)


def test_normal_kl_known_values():
    m1, lv1 = torch.tensor([0.0, 1.0, 0.3]), torch.tensor([0.0, 0.0, math.log(0.5)])
    m2, lv2 = torch.tensor([0.0, 0.0, -0.2]), torch.tensor([0.0, 0.0, math.log(2.0)])
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(dig.normal_kl(m1, lv1, m2, lv2), expected)
    assert dig.normal_kl(m1, lv1, m2, lv2)[1].item() == pytest.approx(0.5)


def test_discretized_likelihood_is_a_distribution_over_the_256_bins():
    bins = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, math.log(0.3)), (0.9, math.log(0.05)), (-0.4, 0.5)]:
        logp = dig.discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean),
                                                       torch.full_like(bins, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    # A very narrow Gaussian on a bin centre puts all its mass in that bin.
    x = torch.tensor([-1.0, 0.0, 1.0])
    logp = dig.discretized_gaussian_log_likelihood(x, x, torch.full_like(x, -10.0))
    torch.testing.assert_close(logp, torch.zeros(3), atol=1e-6, rtol=0)


def test_perfect_model_has_zero_loss(diffusion):
    # A "model" that outputs the true noise and v = -1 (variance = the true posterior variance) matches the
    # posterior exactly: MSE 0 and KL 0 for every t >= 1.
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([1, 2, 300, 999])
    perfect = lambda x, t, **kwargs: torch.cat([noise, -torch.ones_like(noise)], dim=1)
    losses = diffusion.training_losses(perfect, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (4,)
    torch.testing.assert_close(losses["mse"], torch.zeros(4))
    torch.testing.assert_close(losses["vb"], torch.zeros(4), atol=1e-4, rtol=0)
    # A wrong variance costs KL > 0, and the bound's gradient reaches the variance but not the eps output.
    out = torch.cat([noise, torch.zeros_like(noise)], dim=1).requires_grad_()
    losses = diffusion.training_losses(lambda x, t: out, x0, t, noise=noise)
    assert (losses["vb"] > 0).all()
    losses["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0


def test_vb_at_t0_is_the_decoder_nll(diffusion):
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t = torch.zeros(2, dtype=torch.long)
    out = torch.cat([torch.zeros_like(x0), torch.zeros_like(x0)], dim=1)
    losses = diffusion.training_losses(lambda x, t: out, x0, t, noise=torch.zeros_like(x0))
    p = diffusion._p_from_output(out, diffusion.q_sample(x0, t, torch.zeros_like(x0)), t)
    nll = -dig.discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["vb"], nll / math.log(2))


def test_respacing_keeps_the_marginals(diffusion):
    for spacing, count in [("250", 250), ("ddim50", 50), ("10,20,5", 35), ([4, 4], 8), ("1000", 1000)]:
        spaced = dig.create_diffusion(spacing)
        kept = spaced.timestep_map
        assert spaced.num_timesteps == count == len(set(kept.tolist()))
        assert np.all(np.diff(kept) > 0)
        np.testing.assert_allclose(spaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-12)
    assert dig.space_timesteps(1000, "250")[0] == 0 and dig.space_timesteps(1000, "250")[-1] == 999
    assert dig.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    np.testing.assert_allclose(dig.create_diffusion("1000").betas, diffusion.betas, rtol=1e-10)
    with pytest.raises(ValueError):
        dig.create_diffusion("2000")


def test_respaced_sampler_calls_the_model_with_original_steps():
    spaced = dig.create_diffusion("10")
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    spaced.p_sample_loop(model, (2, 1, 2, 2), noise=torch.randn(2, 1, 2, 2))
    assert seen == sorted(spaced.timestep_map.tolist(), reverse=True) and seen[0] == 999 and seen[-1] == 0


# ---------------------------------------------------------------------------------------------------------
# Sampling


@pytest.fixture(scope="module")
def trained_looking_model():
    torch.manual_seed(0)
    return randomize_(tiny_dig(in_channels=3), std=0.05).eval()


def test_ddim_eta0_is_deterministic(trained_looking_model):
    model = trained_looking_model
    labels = torch.tensor([1, 2])
    noise = torch.randn(2, 3, 8, 8)
    a = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise)
    torch.manual_seed(123)                                   # other global RNG state: must not matter
    b = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    c = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise, eta=1.0)
    assert not torch.equal(a, c)


def test_ddpm_samples_are_finite_and_seeded(trained_looking_model):
    model = trained_looking_model
    labels = torch.tensor([0, 5, 9])
    a = dig.sample(model, labels, steps=20, generator=torch.Generator().manual_seed(7))
    b = dig.sample(model, labels, steps=20, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 3, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    guided = dig.sample(model, labels, steps=20, cfg_scale=4.0, generator=torch.Generator().manual_seed(7))
    assert guided.shape == a.shape and torch.isfinite(guided).all() and not torch.allclose(guided, a)


def test_guidance_scale_one_equals_the_conditional_model(trained_looking_model):
    # The guided path (batch doubled, null labels) at a scale of 1 must reproduce the plain conditional sampler.
    model = trained_looking_model
    labels = torch.tensor([3, 4])
    noise = torch.randn(2, 3, 8, 8)
    plain = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise, cfg_scale=1.0)
    guided_path = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise, cfg_scale=1.0 + 1e-12)
    torch.testing.assert_close(guided_path, plain, atol=1e-4, rtol=1e-4)


def test_fixed_variance_model_trains_and_samples():
    # learn_sigma=False: the model predicts eps only; the variance is fixed and the loss is the MSE alone.
    model = randomize_(tiny_dig(in_channels=3, learn_sigma=False), std=0.05).eval()
    x, t, y = inputs(model, n=2)
    losses = dig.create_diffusion().training_losses(model, x, t, {"y": y})
    assert torch.equal(losses["vb"], torch.zeros(2)) and torch.equal(losses["loss"], losses["mse"])
    out = dig.sample(model, y, steps=5, cfg_scale=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sample_rejects_bad_arguments(trained_looking_model):
    with pytest.raises(ValueError, match="sampler"):
        dig.sample(trained_looking_model, torch.tensor([1]), steps=5, sampler="euler")
    with pytest.raises(ValueError, match="noise"):
        dig.sample(trained_looking_model, torch.tensor([1]), steps=5, noise=torch.randn(1, 3, 4, 4))
