"""FID / KID / IS / precision-recall (scoresde.fidelity) against closed forms and against torch-fidelity.

Closed forms: the Fréchet distance of Gaussians (1-D, commuting, and the 2x2 non-commuting formula
``tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))``), and the polynomial-kernel MMD^2 of two Gaussians
(moments of ``x.y`` for independent Gaussian vectors, derived in ``_poly_kernel_mean``). The
pipeline (images -> features -> reference file -> metrics) runs with a small feature extractor, so
CI needs neither torch-fidelity nor the Inception weights; where torch-fidelity imports, the same
extractor is registered with it and ``torch_fidelity.calculate_metrics`` must give our numbers; the
real Inception test runs only when its weights are on this machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scoresde import fidelity as fd
from scoresde.fidelity import FidelityError


def _tf_or_reason():
    try:
        import torch_fidelity  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means: not usable here
        return None, f"torch-fidelity not importable here ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return torch_fidelity, ""


TF, TF_REASON = _tf_or_reason()


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------
def test_frechet_distance_one_dimensional():
    # W2^2 of N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    got = fd.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert got == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_distance_commuting_covariances():
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.3, 2.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([0.5, 1.0, 0.0, 0.0])
    q, _ = np.linalg.qr(np.random.RandomState(0).randn(4, 4))  # the same rotation of both keeps them commuting
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fd.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_distance_non_commuting_two_by_two():
    s1 = np.array([[2.0, 0.7], [0.7, 0.5]])
    s2 = np.array([[0.4, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    # for 2x2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); M = s1^1/2 s2 s1^1/2 has tr(s1 s2), det s1 det s2
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.0, 0.5])
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fd.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    assert fd.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-10)
    assert abs(fd.frechet_distance(mu1, s1, mu1, s1)) < 1e-12


def test_frechet_distance_of_gaussian_features_converges_to_the_closed_form():
    s1 = np.array([[2.0, 0.7], [0.7, 0.5]])
    s2 = np.array([[0.4, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.0, 0.5])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    rng = np.random.RandomState(1)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    # the plug-in estimate's error is O(1/sqrt(n)) ~ 1e-2 of the spread; the value is ~4.2
    assert fd.frechet_distance(*fd.gaussian_statistics(x), *fd.gaussian_statistics(y)) == pytest.approx(want, abs=0.03)


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------
def _poly_kernel_mean(mu1, s1, mu2, s2, gamma, c):
    """E (gamma x.y + c)^3 for independent x ~ N(mu1, s1), y ~ N(mu2, s2).

    Given y, u = gamma x.y + c ~ N(m, v), m = gamma mu1.y + c, v = gamma^2 y's1y, and E u^3 = m^3 + 3 m v.
    Over y = mu2 + w: m ~ N(a, b), a = gamma mu1.mu2 + c, b = gamma^2 mu1's2mu1, so E m^3 = a^3 + 3ab;
    E[m y's1y] = a (mu2's1mu2 + tr(s1 s2)) + 2 gamma mu1's2s1mu2 (odd moments of w vanish).
    """
    a = gamma * mu1 @ mu2 + c
    b = gamma**2 * mu1 @ s2 @ mu1
    return a**3 + 3 * a * b + 3 * gamma**2 * (a * (mu2 @ s1 @ mu2 + np.trace(s1 @ s2)) + 2 * gamma * mu1 @ s2 @ s1 @ mu2)


def test_kernel_distance_is_unbiased_for_the_gaussian_closed_form():
    d = 3
    mu1, mu2 = np.array([0.5, 0.0, -0.5]), np.array([0.0, 0.8, 0.0])
    s1 = np.array([[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.6]])
    s2 = np.array([[0.5, -0.2, 0.0], [-0.2, 1.2, 0.0], [0.0, 0.0, 0.9]])
    g = 1.0 / d
    want = (_poly_kernel_mean(mu1, s1, mu1, s1, g, 1.0) + _poly_kernel_mean(mu2, s2, mu2, s2, g, 1.0)
            - 2 * _poly_kernel_mean(mu1, s1, mu2, s2, g, 1.0))
    rng = np.random.RandomState(2)
    x = rng.multivariate_normal(mu1, s1, size=60_000)
    y = rng.multivariate_normal(mu2, s2, size=60_000)
    # 60 disjoint-ish subsets of 1,000: the mean of unbiased estimates; its standard error is std / sqrt(60)
    mean, std = fd.kernel_distance(x, y, subsets=60, subset_size=1000, seed=0)
    assert want > 0.1
    assert abs(mean - want) < 4 * std / math.sqrt(60) + 1e-3, (mean, want, std)
    # same distribution: MMD^2 = 0, and the unbiased estimate scatters around it
    mean0, std0 = fd.kernel_distance(x[:30_000], x[30_000:], subsets=60, subset_size=1000, seed=0)
    assert abs(mean0) < 4 * std0 / math.sqrt(60) + 1e-4


def test_polynomial_mmd2_is_the_unbiased_formula():
    rng = np.random.RandomState(3)
    x, y = rng.randn(5, 2), rng.randn(5, 2) + 1
    k = lambda a, b: (a @ b / 2 + 1) ** 3
    m = 5
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert fd.polynomial_mmd2(x, y) == pytest.approx(within - 2 * cross, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# IS and precision / recall
# ---------------------------------------------------------------------------------------------
def test_inception_score_extremes():
    k, n = 10, 1000
    confident = torch.full((n, k), -50.0)
    confident[torch.arange(n), torch.arange(n) % k] = 50.0  # sure of one class, classes balanced in every split
    mean, std = fd.inception_score(confident, splits=10, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    same = torch.randn(1, k).expand(n, k)  # every image gets the same prediction: KL = 0
    assert fd.inception_score(same, splits=5)[0] == pytest.approx(1.0, abs=1e-12)


def test_precision_recall_cases():
    rng = np.random.RandomState(4)
    a = rng.randn(300, 4)
    assert fd.precision_recall(a, a) == (1.0, 1.0)
    assert fd.precision_recall(a, a + 100.0) == (0.0, 0.0)
    # generated = a tight cluster at the reference's centre: all inside (precision 1), covering little (recall < 1/2)
    p, r = fd.precision_recall(0.05 * rng.randn(300, 4), a)
    assert p == 1.0 and r < 0.5


# ---------------------------------------------------------------------------------------------
# the pipeline with a small feature extractor (no torch-fidelity, no Inception weights)
# ---------------------------------------------------------------------------------------------
class _ToyBody(torch.nn.Module):
    """uint8 (B, 3, H, W) -> 4x4 average pool -> fixed random projection: 'feat' (8) and 'logits' (5)."""

    FEATURES = ("feat", "logits")

    def _build(self):
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(48, 8, generator=g) / 48**0.5)
        self.register_buffer("v", torch.randn(8, 5, generator=g))

    def _features(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        z = torch.nn.functional.adaptive_avg_pool2d(x.float() / 127.5 - 1, 4).flatten(1)
        f = torch.tanh(3 * z @ self.w)
        return f, 4 * f @ self.v

    @staticmethod
    def get_provided_features_list():
        return _ToyBody.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)


class ToyExtractor(_ToyBody):
    def __init__(self, name="scoresde-toy", features_list=_ToyBody.FEATURES, **kwargs):
        super().__init__()
        self.name, self.features_list = name, list(features_list)
        self._build()

    def get_name(self):
        return self.name

    def convert_features_tuple_to_dict(self, features):
        return dict(zip(self.features_list, features))

    def forward(self, x):
        f = dict(zip(self.FEATURES, self._features(x)))
        return tuple(f[k] for k in self.features_list)


def _images(n, seed, shape=(3, 8, 8), shift=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, *shape), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def test_reference_file_round_trip_and_self_comparison(tmp_path):
    ex = ToyExtractor()
    real = _images(400, 0)
    ref = fd.reference_statistics(real, ex, keep_features=300)
    path = tmp_path / "ref.npz"
    ref.save(path)
    back = fd.Reference.load(path)
    assert back.n == 400 and back.shape == (3, 8, 8) and back.features.shape == (300, 8) and back.extractor == "scoresde-toy"
    np.testing.assert_array_equal(back.mu, ref.mu)
    same = fd.evaluate(real, back, ex, kid_subset_size=100, kid_subsets=10)
    assert abs(same["fid"]) < 1e-8
    # every sample is a reference image (distance 0), so recall is 1; the 300 kept references cover >= 3/4 of them
    assert same["recall"] == 1.0 and same["precision"] >= 300 / 400
    other = fd.evaluate(_images(400, 1, shift=40), back, ex, kid_subset_size=100, kid_subsets=10)
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-6) and other["kid_mean"] > 10 * abs(same["kid_mean"])
    assert other["kid_subset_size"] == 100 and set(other) >= {"isc_mean", "isc_std", "recall"}


def test_images_from_npz_pt_png_and_shards_agree(tmp_path):
    from PIL import Image

    x = torch.rand(6, 3, 4, 4) * 2 - 1
    u8 = fd.to_uint8(x)
    assert torch.equal(u8, ((x.double() + 1) * 127.5).round().to(torch.uint8))
    np.savez(tmp_path / "s.npz", x=x.numpy(), seed=np.asarray(3))
    torch.save({"x": x}, tmp_path / "s.pt")
    (tmp_path / "png").mkdir()
    for i, img in enumerate(u8):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "png" / f"{i:03d}.png")
    for src in ("s.npz", "s.pt", "png"):
        assert torch.equal(fd.load_images(tmp_path / src), u8), src
    # a shard folder of generate_shards (a stand-in network: eps = x / 2)
    from scoresde.generate import generate_shards, load_shards
    from scoresde.sde import VPSDE

    generate_shards(lambda x, t: x / 2, VPSDE(), (3, 4, 4), 7, tmp_path / "shards", shard_size=3, sampler="ddim", steps=2)
    want = fd.to_uint8(load_shards(tmp_path / "shards").clamp(-1, 1))
    assert torch.equal(fd.load_images(tmp_path / "shards"), want) and want.shape == (7, 3, 4, 4)


def test_dataset_images_are_the_stored_levels():
    imgs = fd.dataset_images("digits", split="test", n=50)
    assert imgs.dtype == torch.uint8 and imgs.shape == (50, 1, 8, 8)
    levels = set(imgs.unique().tolist())
    assert levels <= {round(k * 255 / 16) for k in range(17)}


def test_bad_input_gives_one_clear_error(tmp_path):
    ex = ToyExtractor()
    ref = fd.reference_statistics(_images(50, 0), ex)
    with pytest.raises(FidelityError, match="no reference statistics file at .*missing.npz"):
        fd.Reference.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FidelityError, match="not a reference statistics file"):
        fd.Reference.load(tmp_path / "junk.npz")
    with pytest.raises(FidelityError, match=r"samples are 3x16x16 .* reference was computed on 3x8x8"):
        fd.evaluate(_images(20, 1, shape=(3, 16, 16)), ref, ex)
    with pytest.raises(FidelityError, match=r"samples are 1x8x8"):
        fd.evaluate(_images(20, 1, shape=(1, 8, 8)), ref, ex)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FidelityError, match="no images .* found under"):
        fd.load_images(tmp_path / "empty")
    with pytest.raises(FidelityError, match="no samples at"):
        fd.load_images(tmp_path / "nowhere")
    with pytest.raises(FidelityError, match="at least 2 samples"):
        fd.evaluate(_images(1, 1), ref, ex)
    with pytest.raises(FidelityError, match="unknown metric"):
        fd.evaluate(_images(20, 1), ref, ex, metrics=("fid", "lpips"))
    with pytest.raises(FidelityError, match="NaN"):
        fd.to_uint8(torch.full((2, 3, 4, 4), float("nan")))


def test_missing_inception_weights_name_the_file_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(fd.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FidelityError) as e:
        fd.inception_weights_path(download=False)
    msg = str(e.value)
    assert fd.INCEPTION_WEIGHTS_FILE in msg and fd.INCEPTION_WEIGHTS_URL in msg and "--weights" in msg and "\n" not in msg
    with pytest.raises(FidelityError, match="does not exist .*weights-inception"):
        fd.inception_weights_path(tmp_path / "nope.pth")
    monkeypatch.setenv(fd.WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(FidelityError, match="env.pth does not exist"):
        fd.inception_weights_path()
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / fd.INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.delenv(fd.WEIGHTS_ENV)
    assert fd.inception_weights_path(download=False) == cached


# ---------------------------------------------------------------------------------------------
# against torch-fidelity itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(TF is None, reason=TF_REASON)
def test_metrics_agree_with_torch_fidelity_on_the_same_features():
    class TFToy(TF.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.body = ToyExtractor(name, features_list)

        get_provided_features_list = staticmethod(_ToyBody.get_provided_features_list)
        get_default_feature_layer_for_metric = staticmethod(_ToyBody.get_default_feature_layer_for_metric)
        can_be_compiled = staticmethod(_ToyBody.can_be_compiled)
        get_dummy_input_for_compile = staticmethod(_ToyBody.get_dummy_input_for_compile)

        def forward(self, x):
            return self.body(x)

    try:
        TF.register_feature_extractor("scoresde-toy", TFToy)
    except ValueError:  # already registered in this process
        pass

    gen, real = _images(300, 5, shift=20), _images(400, 6)
    theirs = TF.calculate_metrics(input1=Images(gen), input2=Images(real), feature_extractor="scoresde-toy", fid=True,
                                  kid=True, isc=True, prc=True, kid_subsets=20, kid_subset_size=200, isc_splits=5,
                                  cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=64)
    ex = ToyExtractor()
    ref = fd.reference_statistics(real, ex, keep_features=400)
    ours = fd.evaluate(gen, ref, ex, kid_subsets=20, kid_subset_size=200, isc_splits=5, batch_size=64)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)
    assert ours["isc_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["isc_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-5)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)  # theirs is a float32 mean; one sample is 1/300
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)


def _weights_or_reason():
    if TF is None:
        return None, TF_REASON
    try:
        return fd.inception_weights_path(download=False), ""
    except FidelityError:
        return None, (f"no Inception weights on this machine ({fd.INCEPTION_WEIGHTS_FILE} not in "
                      f"${fd.WEIGHTS_ENV} or torch-fidelity's cache); nothing may download during tests")


class Images(torch.utils.data.Dataset):
    """Images as the map-style dataset torch-fidelity's calculate_metrics reads."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


WEIGHTS, WEIGHTS_REASON = _weights_or_reason()


@pytest.mark.slow
@pytest.mark.skipif(WEIGHTS is None, reason=WEIGHTS_REASON)
def test_real_inception_matches_torch_fidelity():
    gen, real = _images(120, 7, shape=(3, 32, 32), shift=30), _images(150, 8, shape=(3, 32, 32))
    ex = fd.inception_extractor(WEIGHTS, download=False)
    ours = fd.evaluate(gen, fd.reference_statistics(real, ex), ex, kid_subsets=10, kid_subset_size=100, isc_splits=3)
    theirs = TF.calculate_metrics(input1=Images(gen), input2=Images(real), fid=True, kid=True, isc=True, kid_subsets=10,
                                  kid_subset_size=100, isc_splits=3, cuda=False, cache=False, verbose=False,
                                  save_cpu_ram=True, feature_extractor_weights_path=str(WEIGHTS))
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-5)
    assert ours["isc_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# the command line: `scoresde fid ref` / `scoresde fid calc`
# ---------------------------------------------------------------------------------------------
def _fid_cli():
    import typer

    try:  # the installed name of the cli/ folder
        from scoresde_cli import evaluate
    except ImportError:  # a checkout not reinstalled since the folder got its own import name
        from cli import evaluate
    app = typer.Typer()

    @app.command()
    def _noop() -> None:  # a second command keeps typer from flattening the group
        pass

    evaluate.register(app)
    return app, evaluate


def _invoke(app, *args):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(res, needle):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output and len(lines) == 1 and lines[0].startswith("Error:"), res.output
    assert needle in lines[0], res.output


def test_cli_reference_then_score_prints_json(tmp_path, monkeypatch):
    import json

    app, evaluate = _fid_cli()
    monkeypatch.setattr(evaluate, "_extractor", lambda weights, download, device: ToyExtractor())
    real, gen = _images(200, 0), _images(120, 1, shift=30)
    np.savez(tmp_path / "real.npz", x=real.numpy())
    np.savez(tmp_path / "gen.npz", x=gen.numpy())
    res = _invoke(app, "fid", "ref", "--images", tmp_path / "real.npz", "--out", tmp_path / "ref.npz", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["n"] == 200
    res = _invoke(app, "fid", "calc", tmp_path / "gen.npz", "--ref", tmp_path / "ref.npz", "--kid-subset-size", 50,
                  "--kid-subsets", 5, "-q", "--out", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    ref = fd.Reference.load(tmp_path / "ref.npz")
    want = fd.evaluate(gen, ref, ToyExtractor(), kid_subsets=5, kid_subset_size=50)
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-12) and got["kid_mean"] == pytest.approx(want["kid_mean"], rel=1e-12)
    assert json.loads((tmp_path / "m.json").read_text())["fid"] == got["fid"]


def test_cli_bad_input_is_one_line(tmp_path, monkeypatch):
    app, evaluate = _fid_cli()
    monkeypatch.setattr(evaluate, "_extractor", lambda weights, download, device: ToyExtractor())
    np.savez(tmp_path / "gen.npz", x=_images(30, 1, shape=(1, 8, 8)).numpy())
    fd.reference_statistics(_images(30, 0), ToyExtractor()).save(tmp_path / "ref.npz")
    _one_line_error(_invoke(app, "fid", "calc", tmp_path / "gen.npz", "--ref", tmp_path / "missing.npz"),
                    "no reference statistics file at")
    _one_line_error(_invoke(app, "fid", "calc", tmp_path / "gen.npz", "--ref", tmp_path / "ref.npz"),
                    "samples are 1x8x8 (C x H x W) but")
    (tmp_path / "empty").mkdir()
    _one_line_error(_invoke(app, "fid", "calc", tmp_path / "empty", "--ref", tmp_path / "ref.npz"), "no images")
    _one_line_error(_invoke(app, "fid", "calc", tmp_path / "gen.npz", "--ref", tmp_path / "ref.npz", "-n", 0),
                    "-n must be at least 2")
    _one_line_error(_invoke(app, "fid", "ref", "--dataset", "digits", "--out", tmp_path / "ref.txt"), "must be a .npz")
    _one_line_error(_invoke(app, "fid", "ref", "--out", tmp_path / "r.npz"), "exactly one of --dataset or --images")


def test_cli_without_weights_names_the_file(tmp_path, monkeypatch):
    app, _ = _fid_cli()
    monkeypatch.delenv(fd.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    res = _invoke(app, "fid", "ref", "--dataset", "digits", "--split", "test", "-n", 10, "--out", tmp_path / "r.npz",
                  "--no-download", "-q")
    # with torch-fidelity: the missing weights file; without it: the missing extra
    _one_line_error(res, fd.INCEPTION_WEIGHTS_FILE if TF is not None else "pip install 'scoresde[eval]'")
    assert not (tmp_path / "r.npz").exists()
