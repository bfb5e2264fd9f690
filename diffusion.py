"""The denoising diffusion probabilistic model (DDPM) of PCCD: paper Eqs. (1)-(6) and (S4),
following Ho et al. (2020) and their notation, with a cosine schedule (Nichol & Dhariwal, 2021),
classifier-free guidance (Ho & Salimans, 2022), DDIM sampling (Song et al., 2021) and inpainting
(Lugmayr et al., 2022): sampling with part of the cloud known, e.g. the composition (channel 1),
and physics-aware sampling (`Physics`, after PhysDiff, Yuan et al. 2023): the predicted x0 made a
physical crystal at every step t <= 500.

The network is whatever it is handed: any `model(x, t, elements, band_gap, magnetic, drop)`
that returns a tensor shaped like x. Clouds live in [0, 1] (data.py); the model sees them in
[-1, 1]. `to_model` and `from_model` are the one place where that mapping happens.
"""
import math
import time

import torch
import torch.nn.functional as F

T = 1000          # diffusion steps (Table S1); every checkpoint records the T it was trained with
COND_DROP = 0.2   # share of crystals trained without the condition, for classifier-free guidance
                  # (pccd.py's training drops it for every crystal noised to a step below condition_above)
# Refinement: the positions of a finished sample are noised back to this step and its last steps
# are run again as the sampler ran them (unconditionally below condition_above), `refine` times, the
# elements and the lattice held. Each pass lets atoms that sit too close move apart; EXPERIMENTS.md,
# "Crowded atoms".
REFINE_FROM = 50


def to_model(cloud):
    """[0, 1] cloud -> [-1, 1], the range the Gaussian noise is scaled for."""
    return cloud * 2.0 - 1.0


def from_model(x):
    """[-1, 1] -> [0, 1] cloud."""
    return (x + 1.0) / 2.0


def translate_randomly(x0):
    """Augmentation: shift every atom of each crystal by one random fractional vector (modulo 1).
    A crystal has no origin, so the shifted cloud is the same crystal. x0 is in the model's
    range [-1, 1], shape (B, 3, 128, 3); only channel 0 moves."""
    shift = torch.rand(len(x0), 1, 3)
    positions = (from_model(x0[:, 0]) + shift) % 1.0
    return torch.cat([to_model(positions)[:, None], x0[:, 1:]], 1)


def known_channels(clouds, channels):
    """What `Diffusion.sample(known=...)` holds when whole channels of the clean clouds (N, 3,
    128, 3) in [0, 1] are known: channel 1 for a given composition (structure prediction), channel
    2 for a given lattice, or both. Returns (mask, x0 in model units)."""
    mask = torch.zeros(1, 3, 1, 1, dtype=torch.bool)
    mask[:, list(channels)] = True
    return mask, to_model(torch.as_tensor(clouds, dtype=torch.float32))


def cosine_beta_schedule(T, s=0.008):
    """betas_1..T such that alphas_cumprod follows cos^2 (Nichol & Dhariwal, Eq. 17), computed
    in float64 and clamped to <= 0.999 *before* the cumulative product is taken (the last beta
    would otherwise be 1 and abar_T exactly 0)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=0.999)


def ddim_timesteps(t_start, steps):
    """The steps DDIM visits: t_start (n - i) / n for i = 0 .. n-1, n = min(steps, t_start + 1),
    rounded to the nearest integer, halves to the even one -- in integer arithmetic, so every
    language visits the same steps (the float t_start * (1 - i / n) rounds differently with C's
    round(), JavaScript's Math.round or in float32, at 175 counts n of 1..1000 from step 999, and
    with Python's round or C's rint, halves to even, at 13)."""
    n = min(steps, t_start + 1)
    visited = []
    for i in range(n):
        q, r = divmod(t_start * (n - i), n)               # t_start (n - i) / n = q + r / n
        visited.append(q + (2 * r > n or (2 * r == n and q % 2 == 1)))
    return sorted(set(visited), reverse=True)


def union_of_knowns(x0, *knowns):
    """One (mask, x0) pair of `sample`'s `known` that holds every entry any of `knowns` holds (None
    ones skipped) to its value in x0; None if there are none."""
    masks = [known[0].to(x0.device) for known in knowns if known is not None]
    if not masks:
        return None
    union = masks[0]
    for mask in masks[1:]:
        union = union | mask
    return union, x0


class Diffusion:
    """The forward process q and the reverse process p_theta over T steps. Index t = 0 .. T-1
    here stands for the paper's t = 1 .. T."""

    def __init__(self, T=T, prediction="eps"):
        """prediction: what the network outputs. 'eps' (the paper's, Eq. S4) is the noise;
        'v' is v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho, 2022), which at
        large t is mostly -x_0, so the network must say there what crystal it is making."""
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r}: use 'eps' or 'v'")
        self.T, self.prediction = T, prediction
        self.betas = cosine_beta_schedule(T)                               # beta_t
        self.alphas = 1.0 - self.betas                                     # alpha_t = 1 - beta_t
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)                # abar_t = prod alpha_s
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        # variance of q(x_{t-1} | x_t, x_0), Ho et al. Eq. (7): the sigma_t^2 of Eq. (6)
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    def _at(self, values, t, x):
        """values[t] shaped to broadcast against x: (B,) -> (B, 1, 1, 1)."""
        return values.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))

    # ---- forward process and training -----------------------------------------------------

    def q_sample(self, x0, t, noise):
        """Eq. (3): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(self, model, x0, elements, band_gap, magnetic, cond_drop=COND_DROP, t=None,
             composition_given=None):
        """Eq. (S4): E_{t, x0, eps} | eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) |,
        the mean absolute error. The condition is dropped (replaced by the null embedding) for a
        fraction `cond_drop` of the batch (a probability, or one per crystal, shape (B,)), so the
        same network also learns eps_theta(x_t, t).
        t: the step of each crystal, (B,); drawn uniformly from 0 .. T-1 when None.
        composition_given: None, or (B,) bool: for these crystals channel 1 (the composition) is
          shown clean in x_t and left out of the loss, as structure prediction then holds it."""
        B = x0.shape[0]
        t = torch.randint(0, self.T, (B,), device=x0.device) if t is None else t
        noise = torch.randn_like(x0)
        drop = torch.rand(B, device=x0.device) < cond_drop
        x_t = self.q_sample(x0, t, noise)
        if composition_given is not None:
            given = composition_given[:, None, None, None] & (torch.arange(3, device=x0.device) == 1)[:, None, None]
            x_t = torch.where(given, x0, x_t)
        out = model(x_t, t, elements, band_gap, magnetic, drop)
        abar = self._at(self.alphas_cumprod, t, x0)
        target = abar.sqrt() * noise - (1 - abar).sqrt() * x0 if self.prediction == "v" else noise
        error = (target - out).abs()                                        # (B, 3, 128, 3)
        if composition_given is not None:
            error = error.masked_fill(given, 0.0)
        return error.mean()

    # ---- reverse process ---------------------------------------------------------------------

    def predict_noise(self, model, x, t, condition, guidance):
        """eps = eps_uncond + w (eps_cond - eps_uncond). A v-network's outputs are combined the
        same way (`guided_output`) and then turned into eps (the map is linear, so it is the
        same guidance)."""
        out = self.guided_output(model, x, t, condition, guidance)
        if self.prediction == "v":                  # eps = sqrt(1 - abar) x_t + sqrt(abar) v
            abar = self.alphas_cumprod[t].item()
            return math.sqrt(1 - abar) * x + math.sqrt(abar) * out
        return out

    def guided_output(self, model, x, t, condition, guidance):
        """The network's output (eps or v) guided: out_uncond + w (out_cond - out_uncond). Both
        passes run as one batch; w = 1 is the plain conditional model and w = 0 the
        unconditional one, each a single pass."""
        elements, band_gap, magnetic = condition
        B = x.shape[0]
        tt = torch.full((B,), t, device=x.device, dtype=torch.long)
        if guidance == 0.0:                         # the unconditional model alone: one pass
            out = model(x, tt, elements, band_gap, magnetic, torch.ones(B, dtype=torch.bool, device=x.device))
        elif guidance == 1.0:
            out = model(x, tt, elements, band_gap, magnetic, None)
        else:
            drop = torch.arange(2 * B, device=x.device) >= B              # second half: unconditional
            out_cond, out_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), elements.repeat(2, 1),
                                         band_gap.repeat(2), magnetic.repeat(2), drop).chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        return out

    def predict_x0(self, x, t, eps):
        """Invert Eq. (3) for x_0, clipped to the data range [-1, 1]."""
        abar = self.alphas_cumprod[t].item()
        return ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)

    @torch.no_grad()
    def p_sample(self, model, x, t, condition, guidance, generator=None, physics=None):
        """One ancestral step x_t -> x_{t-1}, Eq. (6):
            x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta) + sigma_t z.
        Written through the predicted x_0 (Ho et al. Eqs. 7 and 15) so that x_0 can be clipped
        to the data range (and made physical, `Physics`); without either the two forms are identical."""
        eps = self.predict_noise(model, x, t, condition, guidance)
        x0 = self.predict_x0(x, t, eps)
        x0 = physics(x0, t) if physics else x0          # Physics (t <= PHYSICS_FROM): commit, project, keep_apart
        abar, abar_prev = self.alphas_cumprod[t].item(), self.alphas_cumprod_prev[t].item()
        beta, alpha = self.betas[t].item(), self.alphas[t].item()
        mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 \
            + (math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * x
        if t == 0:
            return mean
        z = torch.randn(x.shape, generator=generator, device=x.device)
        return mean + math.sqrt(self.posterior_variance[t].item()) * z

    @torch.no_grad()
    def ddim_step(self, model, x, t, t_prev, condition, guidance, physics=None):
        """Deterministic DDIM step x_t -> x_{t_prev} (Song et al. Eq. 12 with sigma = 0):
        sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, eps recomputed from the clipped (and, with
        physics, projected) x0; abar_prev = 1 after the last step (t_prev = -1)."""
        eps = self.predict_noise(model, x, t, condition, guidance)
        x0 = self.predict_x0(x, t, eps)
        x0 = physics(x0, t) if physics else x0          # Physics (t <= PHYSICS_FROM): commit, project, keep_apart
        abar = self.alphas_cumprod[t].item()
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)        # consistent with the x0 used
        abar_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        return math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps

    @torch.no_grad()
    def sample(self, model, condition, *, guidance, condition_above, sampler="ddpm", steps=100, refine=0,
               known=None, known_clean=False, physics=None, x_T=None, t_start=None, generator=None, progress=None,
               trajectory=None):
        """Denoise from step t_start (default T-1: pure noise) to a [0, 1] cloud (B, 3, 128, 3).

        condition: (elements (B, 3), band_gap (B,), magnetic (B,)) long tensors.
        guidance, condition_above: how the condition is used (no defaults on purpose: a
          checkpoint's `sampling` entry says how its network is meant to be sampled). Steps
          t >= condition_above run with guidance w; steps below run unconditionally, one pass.
        sampler: 'ddpm' (ancestral, every step) or 'ddim' (`steps` evenly spaced steps).
        known: None, or (mask, x0) in model units, mask a bool tensor that broadcasts against the
          cloud: the entries under the mask are known to be x0, and are held to x0 noised to each
          step (inpainting, see `hold`); the rest is sampled to agree with them. known_clean: hold
          them to x0 itself at every step, refinement passes too (for a network trained with the
          composition given clean).
        physics: None, or a `Physics`: x0 made physical at steps t <= PHYSICS_FROM (and the
          composition it commits to held from then on, as `known` is).
        refine: how many times to run the last steps of the schedule (those <= REFINE_FROM) again
          on the positions alone: channel 0 is noised back with q (Eq. 3), channels 1 and 2 (the
          elements and the lattice) are held to the sample's, and the positions are denoised
          again, as those steps were the first time (unconditionally where t < condition_above).
        x_T: the starting noisy cloud in model units; drawn from N(0, I) when None.
        progress(i, n): called after each step. trajectory: a dict that receives {t: first cloud}
          (the last step's: the cloud returned, refined if it was).
        """
        elements = condition[0]
        B, device = elements.shape[0], elements.device
        t_start = self.T - 1 if t_start is None else t_start
        x = x_T if x_T is not None else torch.randn((B, 3, 128, 3), generator=generator, device=device)
        if sampler == "ddpm":
            timesteps = list(range(t_start, -1, -1))
        elif sampler == "ddim":
            timesteps = ddim_timesteps(t_start, steps)
        else:
            raise ValueError(f"unknown sampler {sampler!r}: use 'ddpm' or 'ddim'")
        tail = [t for t in timesteps if t <= REFINE_FROM]
        passes = [timesteps] + [tail] * (refine if tail else 0)
        total, done = sum(map(len, passes)), 0
        clean = None                                      # refinement passes: what the first held clean
        model.eval()
        for k, steps_k in enumerate(passes):
            if k == 0:
                x = self.hold(x, known, -1 if known_clean else steps_k[0], generator)
            else:           # a refinement pass: back to step tail[0]; elements and lattice held
                elements_and_lattice = torch.zeros(1, 3, 1, 1, dtype=torch.bool, device=device)
                elements_and_lattice[:, 1:] = True
                # what the first pass held clean (a given or committed composition) stays clean in every refinement
                if known_clean and k == 1:
                    clean = union_of_knowns(x, known, physics.held if physics else None)
                known = union_of_knowns(x, (elements_and_lattice, x), known)
                noise = torch.randn(x.shape, generator=generator, device=device)
                x = self.q_sample(x, torch.full((B,), steps_k[0], device=device), noise)
                x = self.hold(x, clean, -1)
            for i, t in enumerate(steps_k):
                w = guidance if t >= condition_above else 0.0     # >=: step condition_above is guided
                t_prev = steps_k[i + 1] if i + 1 < len(steps_k) else -1
                if sampler == "ddpm":
                    x = self.p_sample(model, x, t, condition, w, generator, physics)
                else:
                    x = self.ddim_step(model, x, t, t_prev, condition, w, physics)
                x = self.hold(x, known, -1 if known_clean and k == 0 else t_prev, generator)
                x = self.hold(x, clean, -1)
                if physics and k == 0:
                    x = self.hold(x, physics.held, -1 if known_clean else t_prev, generator)
                if trajectory is not None and k == 0:     # the first cloud only: Fig. S2
                    trajectory[t] = from_model(x[0]).cpu()
                done += 1
                if progress:
                    progress(done, total)
        if trajectory is not None and len(passes) > 1:    # its last step shows the refined cloud, as decoded
            trajectory[timesteps[-1]] = from_model(x[0]).cpu()
        return from_model(x).clamp(0, 1)

    def hold(self, x, known, t, generator=None):
        """Inpainting (RePaint, Lugmayr et al. 2022): x_t with its known entries replaced by the
        known clean values noised to step t by q, Eq. (3) (the clean values themselves at
        t = -1, the end). Why this samples the unknown part given the known one: q(x_t | x_0)
        is Gaussian with independent entries, so the known entries of x_t can be drawn exactly
        from their clean values; the reverse step then sees an x_t whose known part is as noisy
        as at step t in training, and moves the unknown part towards x_0's that agree with it.
        (RePaint adds resampling to harmonise the two; `refine` passes play that part here.)"""
        if known is None:
            return x
        mask, x0 = known[0].to(x.device), known[1].to(x.device)
        if t >= 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x0 = self.q_sample(x0, torch.full((x.shape[0],), t, device=x.device), noise)
        return torch.where(mask, x0, x)


    def step_milliseconds(self, model, batch_size, device, repeats=20):
        """Milliseconds per training step (loss, backward, Adam) and per guided sampling step
        (both passes), the mean of `repeats` after one warm-up: `pccd.py bench`."""
        x = torch.randn(batch_size, 3, 128, 3, device=device)
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        condition = (torch.randint(1, 84, (batch_size, 3), device=device), zeros, zeros)
        optimizer = torch.optim.Adam(model.parameters(), 1e-4)

        def train_step():
            optimizer.zero_grad()
            self.loss(model, x, *condition).backward()
            optimizer.step()

        def milliseconds(fn):
            fn()                                                         # warm-up
            torch.cuda.synchronize() if device.type == "cuda" else None  # ... finished before the clock starts
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize() if device.type == "cuda" else None  # wait for the GPU's queue
            return 1000 * (time.perf_counter() - start) / repeats

        train_ms = milliseconds(train_step)
        with torch.no_grad():
            return train_ms, milliseconds(lambda: self.predict_noise(model.eval(), x, 500, condition, guidance=2.0))


# ---- Physics-aware sampling ---------------------------------------------------------------
PHYSICS_FROM = 500     # steps t <= this: the x0 prediction is projected and its atoms kept apart;
                       # generation commits to an atom layout at the first of them
SEPARATION = 0.9       # s: atoms i, j are pushed to at least s (r_i + r_j) apart (covalent radii)
MIN_VOLUME_SHARE = 1.0  # a cell smaller than this share of the volume its atoms take is scaled up to it
REPULSION_STEPS = 8    # rounds of pushing per step
_IMAGES = torch.tensor([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)],
                       dtype=torch.float32)


class Physics:
    """Physics-aware sampling: at every step t <= PHYSICS_FROM the network's prediction of the
    clean cloud, x0, is replaced by the nearest physical one before the step is taken -- the idea
    of physics-guided diffusion (PhysDiff, Yuan et al. 2023, which projects x0 with a simulator
    inside the sampling loop). Two named steps, on each committed sample:
      `project`    every block of points (the points one atom owns, data.point_owner) is set to
                   its circular mean, channel 1 to the committed composition, and the lattice rows
                   to their means: the cloud becomes one that a crystal encodes to, exactly; an
                   axis shorter than s (2 r) of the largest atom is stretched to it (the atom's own
                   images are its neighbours too), and a cell smaller than MIN_VOLUME_SHARE of the
                   volume its atoms take (sum of the layout's per-atom volumes) is scaled up to it,
                   its shape kept;
      `keep_apart` atoms closer than s (r_i + r_j) are pushed apart, the lattice held.
    Why the sampler stays a denoiser: a step only needs an estimate of x0 (the DDIM and DDPM
    steps are written through it, as for clipping to [-1, 1]); the estimate is moved to the
    nearest clean cloud a crystal could have, the noise estimate is re-derived from it and x_t,
    and the network sees the result at the next step, so the rest of the denoising adapts.

    Which points make an atom is the layout (data.atom_layouts). Structure prediction knows it
    from the start (`layout`). Generation commits (`commit`) at the first step t <= PHYSICS_FROM:
    x0 is decoded by the clustering decoder (`read_layout`, clouds in [0, 1] -> layout), and from
    then on channel 1 is held to that composition (inpainting, `held`) and the crystal decodes by
    blocks. A sample whose x0 cannot be read there is not committed: it goes on unconstrained
    and is decoded by clustering at the end (`layout["committed"]` says which). Symmetrising
    (data.symmetrise) is outside the loop: `generate` and `csp` apply it to the decoded crystals
    (--symmetrise); doing it to x0 at every step measured about the same (EXPERIMENTS.md)."""

    def __init__(self, length_range, layout=None, read_layout=None):
        """One instance per sampling run: generation's commitment and the layout's tensors are kept."""
        self.log_lo, self.log_hi = math.log(length_range[0]), math.log(length_range[1])
        self.layout, self.read_layout, self.held, self._tensors = layout, read_layout, None, None

    def __call__(self, x0, t):
        """The physical x0 for step t (model units); x0 itself above PHYSICS_FROM."""
        if t > PHYSICS_FROM:
            return x0
        if self.layout is None:                                       # generation: at the first such step
            self.commit(x0)
        return self.keep_apart(self.project(x0))

    def commit(self, x0):
        """Generation's commitment to an atom layout: x0 (model units) is decoded by the clustering
        decoder (`read_layout`); each sample it can read has its composition held from now on
        (`held`: channel 1, a (mask, x0) pair of `Diffusion.sample`'s `known`), the others go on
        unconstrained (`layout["committed"]` False: `project` and `keep_apart` leave them alone)."""
        self.layout = self.read_layout(from_model(x0).cpu().numpy())
        mask = torch.zeros(len(x0), 3, 1, 1, dtype=torch.bool, device=x0.device)
        mask[:, 1] = self.tensors(x0)["committed"][:, None, None]
        self.held = (mask, to_model(self.clouds_of(x0)))

    def tensors(self, x0):
        """The layout's arrays (data.atom_layouts) as tensors on x0's device, made at first use (one
        Physics per sampling run, on one device), and the 27 neighbouring cells' offsets."""
        if self._tensors is None:
            self._tensors = {key: torch.as_tensor(value, device=x0.device)
                             for key, value in self.layout.items() if key != "counts"}
            for key in ("radius", "volume"):
                self._tensors[key] = self._tensors[key].to(x0.dtype)
            self._tensors["images"] = _IMAGES.to(device=x0.device, dtype=x0.dtype)
        return self._tensors

    def clouds_of(self, x0):
        """x0 (model units) with channel 1 set to the layout's composition, in [0, 1]."""
        layout, clouds = self.tensors(x0), from_model(x0).clone()
        clouds[layout["committed"], 1] = layout["composition"][layout["committed"]]
        return clouds

    def project(self, x0):
        """Blocks to their circular means, channel 1 to the composition, lattice rows to their means;
        short axes stretched, small cells scaled up."""
        layout, clouds = self.tensors(x0), self.clouds_of(x0)
        owner = layout["owner"].unsqueeze(-1).expand(-1, -1, 3)                          # (B, 128, 3)
        clouds[:, 0] = self.atoms(clouds[:, 0], layout["owner"]).gather(1, owner)
        half = clouds.shape[2] // 2
        clouds[:, 2, :half] = clouds[:, 2, :half].mean(1, keepdim=True)
        clouds[:, 2, half:] = clouds[:, 2, half:].mean(1, keepdim=True)
        scale = self.log_hi - self.log_lo                                  # a length's row is (log L - log lo) / scale
        # an axis shorter than s (2 r) of the largest atom would crowd that atom with its own image
        shortest = SEPARATION * 2 * layout["radius"].amax(1).clamp(min=1e-3)
        clouds[:, 2, half:] = torch.maximum(clouds[:, 2, half:], ((shortest.log() - self.log_lo) / scale)[:, None, None])
        wanted = MIN_VOLUME_SHARE * layout["volume"].sum(1)
        G = self.metric(clouds)
        det = torch.linalg.det(G)              # V^2; over a^2 b^2 c^2 it is 1 for right angles, <= 0 where no cell is
        grow = torch.where(det / G.diagonal(dim1=1, dim2=2).prod(1) > 1e-3,           # flatter: left alone
                           torch.log((wanted / det.clamp(min=1e-12).sqrt()).clamp(min=1.0)) / 3, 0.0)
        clouds[:, 2, half:] = (clouds[:, 2, half:] + grow[:, None, None] / scale).clamp(0, 1)
        return torch.where(layout["committed"][:, None, None, None], to_model(clouds), x0)

    @staticmethod
    def atoms(positions, owner):
        """Circular mean of each atom's points: (B, 128, 3) in [0, 1], owner (B, 128) the atom of each
        point -> (B, 16, 3), 16 the most atoms a cloud holds (data.MAX_SITES)."""
        own = F.one_hot(owner, 16).to(positions.dtype)                                   # (B, 128, 16)
        angle = 2 * math.pi * positions
        mean = torch.atan2(own.transpose(1, 2) @ angle.sin(), own.transpose(1, 2) @ angle.cos())
        return (mean / (2 * math.pi)) % 1.0

    def metric(self, clouds):
        """The metric tensor G = L L^T of each cell, (B, 3, 3), from its lattice rows: the
        squared length of a fractional vector d is d G d^T; G_ij = |a_i| |a_j| cos(angle_ij)."""
        half = clouds.shape[2] // 2
        angles = torch.deg2rad(clouds[:, 2, :half].mean(1) * 180.0)             # alpha, beta, gamma
        lengths = torch.exp(self.log_lo + clouds[:, 2, half:].mean(1) * (self.log_hi - self.log_lo))
        cos = torch.cos(angles)
        cos_ij = torch.stack([torch.stack([torch.ones_like(cos[:, 0]), cos[:, 2], cos[:, 1]], -1),
                              torch.stack([cos[:, 2], torch.ones_like(cos[:, 0]), cos[:, 0]], -1),
                              torch.stack([cos[:, 1], cos[:, 0], torch.ones_like(cos[:, 0])], -1)], 1)
        return lengths[:, :, None] * lengths[:, None, :] * cos_ij

    def keep_apart(self, x0):
        """Push atoms apart: REPULSION_STEPS rounds of gradient descent on the soft-sphere energy
        E = 1/2 sum_{i != j, images} max(0, s (r_i + r_j) - d_ij)^2, each atom moving half of
        every overlap it has, along the line between the two (in the cell's metric, so a step of
        fractional coordinates delta (overlap / d) is a move of `overlap` A). Two atoms alone meet
        s (r_i + r_j) after one round; atoms already that far apart do not move."""
        layout = self.tensors(x0)
        radius = layout["radius"][:, : max(1, int((layout["radius"] > 0).sum(1).max()))]   # up to the most atoms
        clouds = from_model(x0)
        G, atoms = self.metric(clouds), self.atoms(clouds[:, 0], layout["owner"])[:, : radius.shape[1]]
        reach = SEPARATION * (radius[:, :, None] + radius[:, None, :])               # (B, A, A)
        reach = reach * (radius[:, :, None] > 0) * (radius[:, None, :] > 0)
        reach = reach * (1 - torch.eye(radius.shape[1], device=x0.device))           # not an atom's own images
        # coincident atoms have no line between them: the one with the higher index goes along +a
        index = torch.arange(radius.shape[1], dtype=x0.dtype, device=x0.device)
        along_a = torch.sign(index[:, None] - index[None, :])[None, :, :, None] \
            * torch.tensor([1.0, 0, 0], dtype=x0.dtype, device=x0.device) / G[:, 0, 0].sqrt()[:, None, None, None]
        active = torch.arange(len(atoms), device=x0.device)                           # samples still overlapping
        for _ in range(REPULSION_STEPS):
            a, g = atoms[active], G[active]
            delta = a[:, :, None] - a[:, None, :]                                       # f_i - f_j
            delta = (delta - delta.round())[:, :, :, None] + layout["images"]          # (b, A, A, 27, 3)
            d = ((delta.flatten(1, 3) @ g).view(delta.shape) * delta).sum(-1).clamp(min=0).sqrt()
            overlap = (reach[active, :, :, None] - d).clamp(min=0)                      # (b, A, A, 27)
            direction = torch.where((d > 1e-6)[..., None], delta / d.clamp(min=1e-6)[..., None],
                                    along_a[active, :, :, None])
            atoms[active] = a + 0.5 * (overlap[..., None] * direction).sum((2, 3))
            active = active[overlap.flatten(1).amax(1) > 0]
            if len(active) == 0:
                break
        clouds = clouds.clone()
        clouds[:, 0] = (atoms % 1.0).gather(1, layout["owner"].unsqueeze(-1).expand(-1, -1, 3))
        return torch.where(layout["committed"][:, None, None, None], to_model(clouds), x0)


GOLDEN_TRACE = (0, 5, 10, 15, 19)    # the 20-step sample's steps whose states the golden file holds


@torch.no_grad()
def golden_tensors(model, sampling):
    """What a port of the network and of DDIM must reproduce (README, Porting), for a checkpoint's
    network and its `sampling` entry: for a fixed input x (model units), steps t and condition, the
    network's output with the condition (`output`) and with the null embedding (`output_null`);
    a 20-step DDIM sample from fixed noise x_T, sampled as `sampling` says (`sample`, in [0, 1]),
    and a 74-step one (`sample_74`: a step count where rounding a float product visits other
    steps), with the steps each visits (`steps`, `steps_74`). To find where a port goes wrong:
    the first cloud's activations at x (`act_*`: time and condition embeddings, the first and the
    deepest encoder outputs, the middle, the last decoder block) and its states at the 20-step
    sample's steps GOLDEN_TRACE (`trace_t`; `trace_x` the cloud entering the step; `trace_out` the
    guided network output, v for a v-network; `trace_x0` the clipped x0 the step moves towards,
    which at t = 999 divides float32 rounding by sqrt(abar) = 4.9e-5: a port matches it there to ~5e-3)."""
    g = torch.Generator().manual_seed(0)
    x, x_T = torch.randn(2, 3, 128, 3, generator=g), torch.randn(2, 3, 128, 3, generator=g)
    t = torch.tensor([900, 100])
    elements = torch.tensor([[3, 27, 8], [12, 8, 0]])      # Li Co O, and Mg O with an empty slot
    band_gap, magnetic = torch.tensor([3, 2]), torch.tensor([4, 0])   # unknown, >= 1.5 eV; unknown, NM
    condition = (elements, band_gap, magnetic)
    activations = {}

    def keep(name):                                        # a forward hook that records, returns None
        def hook(module, inputs, out):
            activations[f"act_{name}"] = out[0].detach().clone()
        return hook
    hooks = [getattr(model, name).register_forward_hook(keep(name))
             for name in ("time", "condition", "down1", "attn3", "mid2", "up1")]
    output = model(x, t, *condition, torch.zeros(2, dtype=torch.bool))
    for hook in hooks:
        hook.remove()
    output_null = model(x, t, *condition, torch.ones(2, dtype=torch.bool))
    ddpm = Diffusion(T=sampling["T"], prediction=sampling["prediction"])
    settings = dict(guidance=sampling["guidance"], sampler="ddim", condition_above=sampling["condition_above"], x_T=x_T)
    trajectory = {}
    sample = ddpm.sample(model, condition, steps=20, trajectory=trajectory, **settings)
    steps = ddim_timesteps(ddpm.T - 1, 20)
    trace = dict(trace_t=[], trace_x=[], trace_out=[], trace_x0=[])
    for i in GOLDEN_TRACE:                   # the first cloud entering step i, and what it gives
        x_i = x_T[:1] if i == 0 else to_model(trajectory[steps[i - 1]])[None]
        w = sampling["guidance"] if steps[i] >= sampling["condition_above"] else 0.0
        first = tuple(c[:1] for c in condition)
        out = ddpm.guided_output(model, x_i, steps[i], first, w)
        x0 = ddpm.predict_x0(x_i, steps[i], ddpm.predict_noise(model, x_i, steps[i], first, w))
        for key, value in (("trace_t", torch.tensor(steps[i])), ("trace_x", x_i[0]), ("trace_out", out[0]),
                           ("trace_x0", x0[0])):
            trace[key].append(value)
    return {k: v.numpy() for k, v in dict(
        x=x, t=t, elements=elements, band_gap=band_gap, magnetic=magnetic, output=output, output_null=output_null,
        x_T=x_T, sample=sample, steps=torch.tensor(steps), sample_74=ddpm.sample(model, condition, steps=74, **settings),
        steps_74=torch.tensor(ddim_timesteps(ddpm.T - 1, 74)), **{k: torch.stack(v) for k, v in trace.items()},
        **activations).items()}
