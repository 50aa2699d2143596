"""FID statistics and Frechet distance (fdistill/eval/fid.py) against independent float64 NumPy/SciPy."""
import numpy as np
import pytest
import scipy.linalg

from fdistill.eval import fid


def _random_stats(rng, dim, rank=None):
  """A mean and an SPD covariance (full rank unless ``rank`` < dim, as with few samples)."""
  a = rng.standard_normal((dim, rank or 2 * dim))
  return rng.standard_normal(dim), a @ a.T / a.shape[1]


def _reference_fid(mu1, s1, mu2, s2):
  """Tr sqrt(S1 S2) as sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): symmetric, no sqrtm of the product."""
  w, v = scipy.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
@pytest.mark.parametrize("dim", [1, 7, 64])
def test_frechet_distance_matches_independent_computation(dim, method):
  rng = np.random.default_rng(dim)
  mu1, s1 = _random_stats(rng, dim)
  mu2, s2 = _random_stats(rng, dim)
  got = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
  np.testing.assert_allclose(got, _reference_fid(mu1, s1, mu2, s2), rtol=1e-9)
  np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1, method=method), got,
                             rtol=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_rank_deficient_and_identical(method):
  rng = np.random.default_rng(0)
  x1, x2 = rng.standard_normal((6, 32)), rng.standard_normal((6, 32)) + 0.5
  # Fewer samples than dims (sqrtm of the singular product goes complex): Tr (S1 S2)^(1/2) is
  # the nuclear norm of A^T B for S1 = A A^T, S2 = B B^T.
  a, b = [(x - x.mean(0)).T / np.sqrt(len(x) - 1) for x in (x1, x2)]
  mu1, mu2, s1, s2 = x1.mean(0), x2.mean(0), a @ a.T, b @ b.T
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * np.linalg.svd(a.T @ b, compute_uv=False).sum())
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2, method=method), want,
                             rtol=1e-6)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-6 * np.trace(s1)
  mu, s = _random_stats(rng, 16)
  assert abs(fid.frechet_distance(mu, s, mu, s, method=method)) < 1e-9 * np.trace(s)
  with pytest.raises(ValueError, match="mismatched"):
    fid.frechet_distance(mu, s, mu[:3], s[:3, :3], method=method)


def test_frechet_distance_bad_method():
  with pytest.raises(ValueError, match="'sqrtm' or 'eigh'"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_streaming_stats_equal_numpy_on_concatenated_chunks():
  rng = np.random.default_rng(1)
  dim = 24
  chunks = [rng.standard_normal((n, dim)).astype(np.float32) * 3 + 1 for n in (5, 17, 1, 40)]
  everything = np.concatenate(chunks).astype(np.float64)
  stats = fid.FeatureStats(dim)
  for chunk in chunks[:2]:
    stats.update(chunk)
  other = fid.FeatureStats(dim)
  for chunk in chunks[2:]:
    other.update(chunk)
  stats.merge(other)  # e.g. statistics from another host
  assert stats.count == everything.shape[0]
  mu, sigma = stats.mean_cov()
  np.testing.assert_allclose(mu, everything.mean(axis=0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(everything, rowvar=False), rtol=1e-10, atol=1e-12)
  assert mu.dtype == sigma.dtype == np.float64
  with pytest.raises(ValueError, match=">= 2 samples"):
    fid.FeatureStats(dim).update(chunks[2]).cov()


def test_reference_roundtrip_and_edm_layout(tmp_path):
  rng = np.random.default_rng(2)
  mu, sigma = _random_stats(rng, 8)
  path = tmp_path / "refs" / "cifar10-32x32.npz"
  fid.save_reference(str(path), mu, sigma)
  assert sorted(np.load(path).files) == ["mu", "sigma"]  # EDM fid-refs keys
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
  got_mu, got_sigma = fid.load_reference(str(path))
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  # An EDM-style file written with float32 arrays loads as float64.
  edm = tmp_path / "edm.npz"
  np.savez(edm, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  assert fid.load_reference(str(edm))[1].dtype == np.float64
  stats = fid.FeatureStats(8).update(rng.standard_normal((30, 8)))
  assert fid.fid_from_stats(stats, (mu, sigma)) > 0
  bad = tmp_path / "bad.npz"
  np.savez(bad, mean=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    fid.load_reference(str(bad))
  with pytest.raises(ValueError, match="does not exist"):
    fid.load_reference(str(tmp_path / "missing.npz"))
