"""Score networks: shapes, conditioning, guidance, presets and configs (contract ``model(x, t, y) -> eps``)."""

import json
import math

import pytest
import torch

from scoresde.networks import (
    MLP,
    PRESETS,
    ClassifierFreeGuidance,
    GaussianFourierEmbedding,
    SinusoidalEmbedding,
    UNet,
    build_model,
    count_parameters,
    model_from_config,
)




def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    # (torch.testing.assert_close imports torch.distributed on first use: seconds per test run)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs diff {float((a - b).abs().max()):.3g}"


def randomize(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give the zero-initialised layers random weights, so every input can reach the output."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if bool((p == 0).all()):
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


IMAGE_CASES = [((1, 8, 8), 1), ((1, 8, 8), 3), ((3, 32, 32), 1), ((3, 32, 32), 5)]


@pytest.mark.parametrize("shape,batch", IMAGE_CASES)
def test_unet_output_shape_and_finite_for_odd_batches(shape, batch):
    model = randomize(build_model("tiny", data_shape=shape))
    x, t = torch.randn(batch, *shape), torch.rand(batch)
    out = model(x, t)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0  # the randomised net is not trivially zero


def test_untrained_unet_predicts_zero_because_last_conv_is_zero_initialised():
    model = build_model("tiny", data_shape=(1, 8, 8))
    assert torch.equal(model(torch.randn(4, 1, 8, 8), torch.rand(4)), torch.zeros(4, 1, 8, 8))


def test_unet_samples_do_not_interact_within_a_batch():
    # GroupNorm and attention are per sample: a batch-coupling layer (BatchNorm, attention over
    # the batch axis) would break samplers that evaluate different batch sizes.
    model = randomize(build_model("tiny", data_shape=(1, 8, 8)))
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    assert_close(model(x, t)[2:3], model(x[2:3], t[2:3]), atol=1e-5, rtol=1e-5)


def test_unet_every_parameter_gets_a_gradient():
    model = randomize(build_model("tiny", data_shape=(1, 8, 8), num_classes=3)).train()
    y = torch.tensor([0, 1, 2, 3])
    model(torch.randn(4, 1, 8, 8), torch.rand(4), y).pow(2).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not unused


@pytest.mark.parametrize("kind", ["sinusoidal", "fourier"])
def test_time_embedding_varies_with_t_and_model_output_too(kind):
    emb = SinusoidalEmbedding(32) if kind == "sinusoidal" else GaussianFourierEmbedding(32)
    e = emb(torch.tensor([1e-3, 0.1, 0.5, 1.0]))
    assert e.shape == (4, 32)
    dists = torch.cdist(e, e)
    assert bool((dists + torch.eye(4) > 1e-2).all())  # every pair of times is told apart
    model = randomize(build_model("tiny", data_shape=(1, 8, 8), embedding=kind))
    x = torch.randn(1, 1, 8, 8).expand(2, 1, 8, 8)
    out = model(x, torch.tensor([0.1, 0.9]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_fourier_features_do_not_depend_on_global_rng():
    torch.manual_seed(1)
    a = GaussianFourierEmbedding(16)
    torch.manual_seed(2)
    b = GaussianFourierEmbedding(16)
    assert torch.equal(a.W, b.W)


def test_scalar_t_is_broadcast_to_the_batch():
    model = randomize(build_model("tiny", data_shape=(1, 8, 8)))
    x = torch.randn(3, 1, 8, 8)
    assert_close(model(x, 0.3), model(x, torch.full((3,), 0.3)))


def test_class_conditioning_and_null_label():
    model = randomize(build_model("tiny", data_shape=(1, 8, 8), num_classes=10))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    a, b = model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([5, 5]))
    assert (a - b).abs().max() > 1e-3
    # y=None means the null label (index num_classes)
    assert_close(model(x, t), model(x, t, torch.tensor([10, 10])))
    with pytest.raises(ValueError, match="null label 10"):
        model(x, t, torch.tensor([11, 0]))
    with pytest.raises(ValueError, match="shape"):
        model(x, t, torch.tensor([1, 2, 3]))


def test_unconditional_model_rejects_labels():
    model = build_model("tiny", data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="num_classes=None"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1]))


class _CountCalls(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.batches = model, 0, []

    def forward(self, x, t, y=None):
        self.calls += 1
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5])
def test_classifier_free_guidance_equals_formula_in_one_batched_call(scale):
    # float64, so that batched and separate calls agree to ~1e-12 whatever conv algorithm runs
    net = randomize(build_model("tiny", data_shape=(1, 8, 8), num_classes=4)).double()
    counted = _CountCalls(net)
    cfg = ClassifierFreeGuidance(counted, scale, null_label=4)
    x, t, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.tensor([0, 2, 3])
    guided = cfg(x, t, y)
    assert counted.calls == 1 and counted.batches == [6]
    eps_c, eps_u = net(x, t, y), net(x, t, torch.full((3,), 4))  # two separate calls
    assert (eps_c - eps_u).abs().max() > 1e-3  # the check below is not vacuous
    assert_close(guided, eps_u + scale * (eps_c - eps_u), atol=1e-9, rtol=1e-9)


def test_guidance_scale_keyword_and_unconditional_fallback():
    net = randomize(build_model("tiny", data_shape=(1, 8, 8), num_classes=4))
    cfg = ClassifierFreeGuidance(net, 2.0)  # null label read from net.num_classes
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert_close(cfg(x, t, y, scale=1.0), net(x, t, y), atol=1e-5, rtol=1e-5)
    assert_close(cfg(x, t), net(x, t), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="null_label"):
        ClassifierFreeGuidance(lambda x, t, y=None: x, 2.0)


@pytest.mark.parametrize("data_shape", [(2,), (3, 4)])
def test_mlp_shapes_and_conditioning(data_shape):
    model = randomize(build_model("mlp", data_shape=data_shape, num_classes=2, hidden=32, depth=2))
    x, t = torch.randn(5, *data_shape), torch.rand(5)
    out = model(x, t, torch.tensor([0, 1, 2, 0, 1]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (model(x, t, torch.zeros(5, dtype=torch.long)) - model(x, t, torch.ones(5, dtype=torch.long))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(5, 7), t)


def test_untrained_mlp_predicts_zero():
    model = MLP(2, hidden=16, depth=1)
    assert torch.equal(model(torch.randn(3, 2), torch.rand(3)), torch.zeros(3, 2))


@pytest.mark.parametrize("preset,shape,lo,hi", [
    ("tiny", (1, 8, 8), 0.05e6, 0.5e6),
    ("tiny", (3, 32, 32), 0.05e6, 0.5e6),
    ("digits", (1, 8, 8), 0.1e6, 1e6),
    ("small", (1, 28, 28), 2e6, 15e6),
    ("mlp", (2,), 0.1e6, 2e6),
])
def test_presets_build_with_sensible_sizes(preset, shape, lo, hi):
    model = build_model(preset, data_shape=shape)
    assert lo < count_parameters(model) < hi


def test_cifar10_preset_matches_ddpmpp_size():
    # DDPM++ (cont.) CIFAR-10 has about 62M parameters; ours (plain strided-conv resampling, no FIR) is a bit smaller
    model = build_model("cifar10", data_shape=(3, 32, 32))
    assert model.config["channel_mult"] == [1, 2, 2, 2] and model.config["attn_resolutions"] == [16]
    assert 30e6 < count_parameters(model) < 60e6


@pytest.mark.slow
def test_cifar10_preset_forward():
    model = randomize(build_model("cifar10", data_shape=(3, 32, 32), num_classes=10))
    out = model(torch.randn(3, 3, 32, 32), torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset,shape", [("tiny", (1, 8, 8)), ("mlp", (2,))])
def test_model_from_config_round_trip(preset, shape):
    model = randomize(build_model(preset, data_shape=shape, num_classes=3, embedding="fourier"))
    config = json.loads(json.dumps(model.config))  # plain data
    clone = model_from_config(config)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x, t, y = torch.randn(2, *shape), torch.rand(2), torch.tensor([0, 3])
    assert_close(clone(x, t, y), model(x, t, y))
    with pytest.raises(ValueError, match="arch"):
        model_from_config({"arch": "resnet"})
    with pytest.raises(ValueError, match="invalid"):
        model_from_config({**config, "wings": 2})


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_model("huge", data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="image_size 28 cannot be halved 3 times"):
        build_model("cifar10", data_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="image_size 8 cannot be halved"):
        build_model("digits", data_shape=(1, 8, 8), channel_mult=(1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="unknown option"):
        build_model("tiny", data_shape=(1, 8, 8), channels=3)
    with pytest.raises(ValueError, match="square image"):
        build_model("tiny", data_shape=(2,))
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(1, 8, 16, (1, 2), 1, attn_resolutions=(16,))
    with pytest.raises(ValueError, match="embedding"):
        UNet(1, 8, 16, (1, 2), 1, embedding="learned")
    model = build_model("tiny", data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(2, 1, 7, 7), torch.rand(2))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(2, 1, 8, 8), torch.rand(3))


def test_preset_attention_kept_where_the_resolution_exists():
    assert build_model("tiny", data_shape=(1, 8, 8)).config["attn_resolutions"] == [4]
    assert build_model("tiny", data_shape=(3, 32, 32)).config["attn_resolutions"] == [16]
    assert all(set(p) >= {"arch"} for p in PRESETS.values())


@pytest.mark.slow
def test_mlp_learns_the_exact_eps_of_a_gaussian_mixture():
    # Regression onto the closed-form optimal eps (scoresde.GaussianMixture) of the 2-D ring under
    # the VP SDE: a zero-variance target, so a working network must beat the best constant
    # predictor (zero) by a wide margin: 10x is required; 800 steps reach about 100x (ratio 0.010).
    import scoresde

    torch.manual_seed(0)
    sde, mix = scoresde.VPSDE(), scoresde.GaussianMixture.ring()
    model = MLP(2, hidden=128, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x0 = mix.sample(n, g, dtype=torch.float32)
        t = 0.02 + 0.98 * torch.rand(n, generator=g)
        mean, std = sde.marginal(x0, t)
        xt = mean + std[:, None] * torch.randn(n, 2, generator=g)
        return xt, t, mix.eps(sde, xt.double(), t.double()).float()

    for _ in range(800):
        xt, t, target = batch(256)
        loss = (model(xt, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, t, target = batch(4000)
    with torch.no_grad():
        mse = (model(xt, t) - target).pow(2).mean()
    assert mse < 0.1 * target.pow(2).mean()
