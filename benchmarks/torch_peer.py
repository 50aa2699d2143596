"""The PyTorch peer of ``benchmarks/distill_step.py`` (``--peer``): the same steps written the
way the public PyTorch code writes them (DMD2 / FastGen / SiD style, eager, optimiser step
and EMA included), on EDM's own networks (``tests/torch_reference``, test-only torch), at
the same network, batch and precision, timed in the same run.

Steps with a peer (``distill_step.PEER_STEPS``: the PyTorch table of the step-benchmark issue):

  fdistill:generator  G forward and backward; fake score forward without gradient; teacher
                      forward with the input on the gradient path, its bottleneck features
                      (a forward hook) into a 1x1-conv head for the GAN term; the f-distill
                      weight exp(logit) on the DMD gradient; Adam and EMA of G
  fdistill:critic     G forward without gradient; the fake score's DSM update; the head's
                      logistic update on teacher features of fake and real rows (one pass)
  sid:generator       G forward and backward; teacher and fake score with frozen params and
                      the input on the gradient path (SiD's loss, alpha 1.2); Adam and EMA
  sid:critic          G forward without gradient; the fake score's DSM update

Other rows read "no peer". Precision: float32 (TF32 off on CPU), or bfloat16 autocast.
Networks: DDPM++ and ADM (EDM's SongUNet / DhariwalUNet); the DiT has no EDM original.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from torch_reference import edm_reference  # noqa: E402
from torch_reference.kwargs import edm_precond_kwargs  # noqa: E402

SIGMA_INIT = 2.5       # SiD's generator input level; speed does not depend on it
SID_ALPHA = 1.2
EMA_DECAY = 0.9999


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _net(model_config, trainable):
  net = edm_reference.EDMPrecond(**edm_precond_kwargs(model_config)).to(DEVICE)
  return net.train(trainable).requires_grad_(trainable)


def _bottleneck(net):
  """The module whose output is the last encoder feature (EDM's ``model.enc``'s last block)."""
  return list(net.model.enc.values())[-1]


class Peer:
  """Generator, fake score, teacher (and a head on the teacher's bottleneck) with their Adams."""

  def __init__(self, model_config, x_shape, cond_dim, batch, dtype):
    h, w, c = x_shape
    self.shape = (batch, c, h, w)
    self.cond = (torch.nn.functional.one_hot(torch.arange(batch) % cond_dim, cond_dim).float()
                 .to(DEVICE) if cond_dim else None)
    self.autocast = dtype == "bfloat16"
    self.gen, self.fake = _net(model_config, True), _net(model_config, True)
    self.teacher = _net(model_config, False)
    self.ema = [p.detach().clone() for p in self.gen.parameters()]
    self.gen_opt = torch.optim.Adam(self.gen.parameters(), lr=1e-5, betas=(0.0, 0.999))
    self.fake_opt = torch.optim.Adam(self.fake.parameters(), lr=1e-5, betas=(0.0, 0.999))
    self.features = []
    _bottleneck(self.teacher).register_forward_hook(lambda m, i, out: self.features.append(out))
    with torch.no_grad():
      one = torch.zeros((1,) + self.shape[1:], device=DEVICE)
      self.teacher(one, torch.ones(1, device=DEVICE), None if self.cond is None else self.cond[:1])
    channels = self.features.pop().shape[1]
    self.head = torch.nn.Conv2d(channels, 1, 1).to(DEVICE)
    self.head_opt = torch.optim.Adam(self.head.parameters(), lr=1e-4)

  def _autocast(self):
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=self.autocast)

  def _sigma(self, n):
    return torch.exp(torch.randn(n, device=DEVICE) * 1.2 - 1.2)

  def _noised(self, x, sigma):
    return x + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x)

  def _generate(self):
    z = torch.randn(self.shape, device=DEVICE)
    sigma = torch.full((self.shape[0],), SIGMA_INIT, device=DEVICE)
    return self.gen(SIGMA_INIT * z, sigma, self.cond)

  def _teacher_logits(self, x_t, sigma, cond):
    d = self.teacher(x_t, sigma, cond)
    logits = self.head(self.features.pop().float()).flatten(1).mean(1)
    return d, logits

  def _update(self, opt, loss, ema=False):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if ema:
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, list(self.gen.parameters()), 1 - EMA_DECAY)

  def fdistill_generator(self):
    with self._autocast():
      x = self._generate()
      sigma = self._sigma(x.shape[0])
      x_t = self._noised(x, sigma)
      with torch.no_grad():
        d_fake = self.fake(x_t, sigma, self.cond)
      d_teacher, logits = self._teacher_logits(x_t, sigma, self.cond)
      weight = torch.exp(logits).detach().reshape(-1, 1, 1, 1)
      grad = weight * (d_fake - d_teacher.detach()).float()
      target = (x - grad).detach()
      loss = 0.5 * torch.mean((x.float() - target) ** 2)
      loss = loss + 1e-3 * torch.nn.functional.softplus(-logits).mean()
    self._update(self.gen_opt, loss, ema=True)

  def _fake_dsm(self):
    with self._autocast():
      with torch.no_grad():
        x = self._generate().float()
      sigma = self._sigma(x.shape[0])
      x_t = self._noised(x, sigma)
      loss = torch.mean((self.fake(x_t, sigma, self.cond).float() - x) ** 2)
    self._update(self.fake_opt, loss)
    return x_t.detach(), sigma

  def fdistill_critic(self):
    x_t, sigma = self._fake_dsm()
    real_sigma = self._sigma(x_t.shape[0])
    real_t = self._noised(torch.randn(self.shape, device=DEVICE), real_sigma)
    cond = None if self.cond is None else torch.cat([self.cond, self.cond])
    with self._autocast():
      with torch.no_grad():
        self.teacher(torch.cat([x_t, real_t]), torch.cat([sigma, real_sigma]), cond)
      feats = self.features.pop().float()
      fake, real = self.head(feats).flatten(1).mean(1).chunk(2)
      loss = (torch.nn.functional.softplus(fake).mean() +
              torch.nn.functional.softplus(-real).mean())
    self._update(self.head_opt, loss)

  def sid_generator(self):
    self.fake.requires_grad_(False)
    with self._autocast():
      x = self._generate()
      sigma = self._sigma(x.shape[0])
      x_t = self._noised(x, sigma)
      d_teacher = self.teacher(x_t, sigma, self.cond).float()
      self.features.clear()
      d_fake = self.fake(x_t, sigma, self.cond).float()
      dd = d_teacher - d_fake
      x = x.float()
      per = (dd * ((d_teacher - x) - SID_ALPHA * dd)).flatten(1).sum(1)
      normaliser = (x - d_teacher).abs().flatten(1).mean(1).detach().clamp_min(1e-5)
      loss = torch.mean(per / normaliser)
    self._update(self.gen_opt, loss, ema=True)
    self.fake.requires_grad_(True)

  def sid_critic(self):
    self._fake_dsm()


def measure(model_config, x_shape, cond_dim, objective, kind, batch, dtype, steps, warmup):
  """``{step_ms, images_per_s}`` of the peer step: median of ``steps`` after ``warmup``."""
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  peer = Peer(model_config, x_shape, cond_dim, batch, dtype)
  step = getattr(peer, f"{objective}_{kind}")
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    step()
    if DEVICE == "cuda":
      torch.cuda.synchronize()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"step_ms": 1e3 * step_s, "images_per_s": batch / step_s,
          "threads": torch.get_num_threads()}
