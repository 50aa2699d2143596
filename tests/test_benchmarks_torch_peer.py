"""benchmarks/torch_peer.py: each PyTorch peer step runs on EDM's network and updates exactly
the networks its JAX counterpart updates (a peer that skipped a backward or trained a frozen
network would time a different step)."""
import pytest

from configs import architectures
from support import scripts

torch = pytest.importorskip("torch")

# Which of (gen, fake, head, teacher) each step changes.
UPDATES = {
    ("fdistill", "generator"): {"gen"},
    ("fdistill", "critic"): {"fake", "head"},
    ("sid", "generator"): {"gen"},
    ("sid", "critic"): {"fake"},
}


def _snapshot(peer):
  nets = {"gen": peer.gen, "fake": peer.fake, "head": peer.head, "teacher": peer.teacher}
  return {k: [p.detach().clone() for p in n.parameters()] for k, n in nets.items()}


@pytest.mark.parametrize("objective,kind", sorted(UPDATES))
def test_peer_step_updates_exactly_its_networks(objective, kind):
  peer_lib = scripts.benchmark("torch_peer")
  torch.manual_seed(0)
  peer = peer_lib.Peer(architectures.tiny_songunet(), (8, 8, 3), 10, 2, "float32")
  before = _snapshot(peer)
  getattr(peer, f"{objective}_{kind}")()
  after = _snapshot(peer)
  changed = {k for k in before
             if any(not torch.equal(a, b) for a, b in zip(before[k], after[k]))}
  assert changed == UPDATES[(objective, kind)]
  assert not peer.features  # every captured teacher feature was consumed
  ema_moved = any(not torch.equal(e, p) for e, p in zip(peer.ema, peer.gen.parameters()))
  assert ema_moved == (kind == "generator")


def test_benchmark_rows_with_a_peer_are_the_peer_steps():
  distill = scripts.benchmark("distill_step")
  peer_lib = scripts.benchmark("torch_peer")
  for step in distill.PEER_STEPS:
    objective, kind = step.split(":")
    assert callable(getattr(peer_lib.Peer, f"{objective}_{kind}"))
  spec = dict(net="ddpmpp", objective="sid", kind="critic")
  assert distill.torch_peer_rows(spec)
  assert not distill.torch_peer_rows(dict(spec, net="dit"))
  assert not distill.torch_peer_rows(dict(spec, objective="rcm"))
  row = distill.add_peer({"status": "ok", "images_per_s": 30.0},
                         {"status": "ok", "images_per_s": 20.0, "step_ms": 100.0})
  assert row["vs_peer"] == pytest.approx(1.5)
