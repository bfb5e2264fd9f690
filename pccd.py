"""PCCD, point-cloud crystal diffusion (Li et al., arXiv:2401.13192): the one command.

    python pccd.py train                train a model on the bundled MP-20 sample (~9 min, CPU)
    python pccd.py reconstruct          the paper's reconstruction experiment (Fig. 1, Table 1)
    python pccd.py generate             new crystals of chosen elements, screened (Table 2)
    python pccd.py evaluate DIR         screen any folder of CIF/POSCAR files
    python pccd.py download             the paper's dataset from the Materials Project
    python pccd.py show FILE            draw a crystal's point cloud (Fig. S1)
    python pccd.py export RUN --out F   a small sampling-only checkpoint (the shipped one)
    python pccd.py bench                parameter count and time per training / sampling step
    python pccd.py roundtrip            encode -> decode fidelity of the representation
    python pccd.py <command> --help     what each command does and takes
"""
import argparse
import copy
import os
import sys
import time

# spglib (under pymatgen's space-group analysis) prints "spglib: ... failed." for odd cells
# while screening; the screening handles them, so the lines are noise.
os.environ.setdefault("SPGLIB_WARNING", "OFF")

import numpy as np
import torch
from pymatgen.core import Composition, Element

import data
import diffusion
import evaluate
import unet

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_TRAIN = os.path.join(HERE, "datasets", "mp20_train.csv")
BUNDLED_VAL = os.path.join(HERE, "datasets", "mp20_val.csv")
DEFAULT_RUN = os.path.join("runs", "default")
CHECKPOINT = "checkpoint.pt"
SHIPPED_CHECKPOINT = os.path.join(HERE, "checkpoints", "pccd_mp20.pt")


def default_checkpoint():
    """What reconstruct and generate use without --checkpoint: the model `python pccd.py train`
    left in runs/default, or else the one shipped in the repository."""
    own = os.path.join(DEFAULT_RUN, CHECKPOINT)
    return own if os.path.exists(own) else SHIPPED_CHECKPOINT


def checkpoint_for(args):
    """--checkpoint, or the default one; says which when it was not named."""
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
        print(f"checkpoint: {os.path.relpath(args.checkpoint)}", file=sys.stderr)
    return args.checkpoint


# Training presets (measured in the README). Explicit flags override them.
PRESETS = {
    "quick": dict(steps=6000, batch_size=32, lr=2e-3, schedule="constant", translate=False,
                  translate_below=None, translate_share=1.0, prediction="v", condition_above=250),
    "hour": dict(steps=8600, batch_size=128, lr=2e-3, schedule="cosine", translate=False,
                 translate_below=None, translate_share=1.0, prediction="v", condition_above=250),
}

# What a run saved before these flags existed did (its checkpoint says None).
SAVED_BEFORE_THE_FLAG = dict(translate=False, translate_below=None, translate_share=1.0, prediction="eps",
                            condition_above=0)


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def load_or_fail(path):
    try:
        crystals = data.load_structures(path)
    except (OSError, ValueError) as e:
        raise UserError(str(e))
    if not crystals:
        raise UserError(f"{path} holds no structure PCCD can encode (<= 3 elements, <= 16 sites)")
    return crystals


def portable_path(path):
    """A path as stored in a checkpoint: relative to this folder when inside it, so a shipped
    checkpoint still finds the bundled data on another machine."""
    path = os.path.abspath(path)
    return os.path.relpath(path, HERE) if path.startswith(HERE + os.sep) else path


def resolve_path(path):
    return path if os.path.isabs(path) else os.path.join(HERE, path)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def encode_dataset(crystals, length_range):
    """Crystals -> the tensors the diffusion model trains on: clouds (N, 3, 128, 3) in [0, 1],
    element atomic numbers (N, 3), band-gap class (N,), magnetic ordering (N,)."""
    clouds, elements, band_gap, magnetic = [], [], [], []
    for c in crystals:
        cloud, symbols = data.encode(c.structure, length_range=length_range)
        z, bg, mag = data.encode_condition(symbols, c.band_gap_class, c.ordering)
        clouds.append(cloud), elements.append(z), band_gap.append(bg), magnetic.append(mag)
    return (torch.from_numpy(np.stack(clouds)), torch.tensor(elements),
            torch.tensor(band_gap), torch.tensor(magnetic))


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything needed to sample later, written atomically
# ----------------------------------------------------------------------------------------------

def save_checkpoint(path, state):
    """Write to a temporary file and rename it, so an interrupted run never leaves a broken one."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def check_condition_above(step):
    if step is not None and not 0 <= step <= 1000:
        raise UserError(f"--condition-above {step}: give a step from 0 to 1000")


def condition_above_of(ckpt, args):
    """The step below which sampling drops the condition: --condition-above, else the one the
    network was trained with (0, every step, for runs saved before the flag)."""
    check_condition_above(args.condition_above)
    if args.condition_above is None:
        args.condition_above = ckpt.get("args", {}).get("condition_above") or 0
    return args.condition_above


def diffusion_of(ckpt):
    """The diffusion process a checkpoint's network was trained for (T = 1000; what it predicts)."""
    prediction = ckpt.get("args", {}).get("prediction") or SAVED_BEFORE_THE_FLAG["prediction"]
    return diffusion.Diffusion(T=1000, prediction=prediction)


def load_checkpoint(path, device="cpu"):
    """Returns (model with EMA weights, in eval mode, on device; the checkpoint dict)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first (python pccd.py train) "
                        f"or name one with --checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        model = unet.UNet(unet.UNetConfig(**ckpt["model_config"])).to(device)
        model.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise UserError(f"{path} is not a PCCD checkpoint ({type(e).__name__}: {e})")
    return model.eval(), ckpt


# ----------------------------------------------------------------------------------------------
# train (paper Table S1, Eq. S4, Fig. S4)
# ----------------------------------------------------------------------------------------------

def learning_rate(args, step):
    """The learning rate at `step`: constant, or cosine-decayed from --lr to 0 over --steps."""
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + np.cos(np.pi * step / args.steps))
    return args.lr


def drop_properties(band_gap, magnetic, p):
    """Replace each crystal's band-gap class, and separately its magnetic ordering, by 'unknown'
    with probability p. The MP-20 rows all carry a band gap, so without this the 'unknown' class
    (generate's default) would be an embedding that training never touched."""
    unknown_bg = data.BAND_GAP_CLASSES.index("unknown")
    unknown_mag = data.MAGNETIC_ORDERINGS.index("unknown")
    band_gap = torch.where(torch.rand(band_gap.shape) < p, unknown_bg, band_gap)
    magnetic = torch.where(torch.rand(magnetic.shape) < p, unknown_mag, magnetic)
    return band_gap, magnetic


def translate_randomly(x0):
    """Augmentation: shift every atom of each crystal by one random fractional vector (modulo 1).
    A crystal has no origin, so the shifted cloud is the same crystal; without this the model
    can learn where the training crystals' atoms sit rather than how atoms sit relative to each
    other. x0 is in the model's range [-1, 1], shape (B, 3, 128, 3); only channel 0 moves."""
    shift = torch.rand(len(x0), 1, 3)
    positions = (diffusion.from_model(x0[:, 0]) + shift) % 1.0
    return torch.cat([diffusion.to_model(positions)[:, None], x0[:, 1:]], 1)


def translations(args):
    """How a run augments, in words, for its first line."""
    if not args.translate:
        return ""
    share = f" of {args.translate_share:.0%} of the crystals" if args.translate_share < 1 else ""
    return ", random translations" + share + (f" below step {args.translate_below}" if args.translate_below else "")


def cmd_train(args):
    device = pick_device(args.device)
    path = os.path.join(args.out, CHECKPOINT)
    if os.path.exists(path) and not args.resume:
        raise UserError(f"{path} exists: continue it with --resume, or choose another --out")
    if args.resume and not os.path.exists(path):
        raise UserError(f"--resume: no checkpoint at {path}")

    check_condition_above(args.condition_above)
    for flag, value, fits, wanted in (                    # each of these implies --translate
            ("--translate-below", args.translate_below, lambda v: 1 <= v <= 1000, "a step from 1 to 1000"),
            ("--translate-share", args.translate_share, lambda v: 0 < v <= 1, "a share in (0, 1]")):
        if value is None:
            continue
        if not fits(value):
            raise UserError(f"{flag} {value:g}: give {wanted}")
        if args.translate is False:
            raise UserError(f"{flag} translates; it contradicts --no-translate")
        args.translate = True
    resumed = load_checkpoint(path)[1] if args.resume else None
    # Settings not given on the command line: the resumed run's, else the preset's.
    earlier = resumed.get("args", {}) if resumed else {}
    args.preset = earlier.get("preset", args.preset)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            if earlier.get(key) is not None:
                value = earlier[key]                      # the resumed run's own setting
            elif resumed and key in SAVED_BEFORE_THE_FLAG:
                value = SAVED_BEFORE_THE_FLAG[key]        # a run saved before the flag existed
            setattr(args, key, value)
    data_path = resolve_path(resumed["data"]) if resumed else args.data
    crystals = load_or_fail(data_path)
    length_range = resumed["length_range"] if resumed else data.fit_length_range([c.structure for c in crystals])
    clouds, elements, band_gap, magnetic = encode_dataset(crystals, length_range)
    x0_all = diffusion.to_model(clouds)                                  # (N, 3, 128, 3) in [-1, 1]
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(args.seed)
    config = unet.UNetConfig(**resumed["model_config"]) if resumed else \
        unet.UNetConfig(widths=tuple(args.widths)) if args.widths else unet.UNetConfig()
    model = unet.UNet(config).to(device)
    ema = copy.deepcopy(model)             # exponential moving average of the weights, for sampling
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    batches = torch.Generator().manual_seed(args.seed)                   # which crystals, per step
    step, losses = 0, []
    if resumed:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, losses = resumed["step"], resumed["losses"]
        torch.set_rng_state(resumed["rng"]["torch"])
        batches.set_state(resumed["rng"]["batches"])
    ddpm = diffusion.Diffusion(T=1000, prediction=args.prediction)
    n_params = unet.count_parameters(model)
    print(f"training a {n_params / 1e6:.2f} M-parameter U-Net on {len(crystals)} crystals, "
          f"device {device}, steps {step} -> {args.steps}, batch {args.batch_size}, lr {args.lr:g} "
          f"({args.schedule}), predicting {args.prediction}{translations(args)}"
          f"{f', no condition below step {args.condition_above}' if args.condition_above else ''}",
          flush=True)

    def checkpoint_state():
        return dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                    model_config=config.to_dict(), step=step, losses=losses,
                    length_range=length_range, data=portable_path(data_path), seed=args.seed,
                    train_ids=[c.material_id for c in crystals],
                    train_compositions=[c.structure.composition.formula for c in crystals],
                    rng=dict(torch=torch.get_rng_state(), batches=batches.get_state()),
                    args=vars(args) | {"run": None})

    start, last_print, first_step = time.time(), 0.0, step
    model.train()
    while step < args.steps:
        idx = torch.randint(0, len(x0_all), (args.batch_size,), generator=batches)
        bg, mag = drop_properties(band_gap[idx], magnetic[idx], args.property_drop)
        x0 = x0_all[idx]
        # The shifts are drawn before the steps, as before --translate-below existed, so that
        # earlier runs (the shipped checkpoint's among them) replay the same random numbers.
        moved = translate_randomly(x0) if args.translate else x0
        t = torch.randint(0, ddpm.T, (len(idx),), device=device)      # the diffusion steps trained at
        chosen = t.cpu() < (args.translate_below or ddpm.T)        # noised below that step ...
        if args.translate_share < 1:                                 # ... and drawn into the share
            chosen &= torch.rand(len(idx)) < args.translate_share
        x0 = torch.where(chosen.view(-1, 1, 1, 1), moved, x0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        # Below --condition-above the condition is always dropped: those steps learn to denoise
        # any crystal without being told which (and sampling then runs them unconditionally).
        cond_drop = torch.where(t < args.condition_above, 1.0, args.cond_drop)
        loss = ddpm.loss(model, x0.to(device), elements[idx].to(device),
                         bg.to(device), mag.to(device), cond_drop, t=t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        step += 1
        losses.append(loss.item())
        now = time.time() - start
        if now - last_print > 10 or step == args.steps:
            last_print = now
            rate = (step - first_step) / now
            print(f"step {step:>6}/{args.steps}  loss {np.mean(losses[-50:]):.4f}  "
                  f"{rate * args.batch_size:7.1f} samples/s  {(args.steps - step) / rate / 60:5.1f} min left",
                  flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(path, checkpoint_state())
    plot_loss(losses, os.path.join(args.out, "loss.png"))
    minutes = (time.time() - start) / 60
    print(f"checkpoint: {path}\nloss curve: {os.path.join(args.out, 'loss.png')}  "
          f"(final loss, mean of last 50 steps: {np.mean(losses[-50:]):.4f}; "
          f"{step - first_step} steps in {minutes:.1f} min)")


def cmd_export(args):
    """A run's checkpoint -> a small file for sampling only: the EMA weights (half precision
    unless --float32), the model configuration, the length range and the training set's
    identities; no optimizer state, so it cannot be resumed."""
    if os.path.exists(args.out):
        raise UserError(f"{args.out} exists: remove it or choose another --out")
    _, ckpt = load_checkpoint(args.source)
    dtype = torch.float32 if args.float32 else torch.float16
    small = {k: ckpt[k] for k in ("model_config", "length_range", "data", "seed", "train_ids",
                                  "train_compositions", "losses", "step", "args") if k in ckpt}
    small["ema"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint(args.out, small)
    print(f"{args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB, EMA weights in {str(dtype)[6:]}, "
          f"step {small.get('step')}")


def plot_loss(losses, path):
    """Fig. S4: the training loss (L1, Eq. S4) per step and its running mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.4, label="batch loss")
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=f"mean of {window} steps")
    ax.set(xlabel="step", ylabel="L1 loss (Eq. S4)", yscale="log", title="PCCD training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Shared by reconstruct and generate
# ----------------------------------------------------------------------------------------------

def fresh_dir(path):
    """`path`, or `path-2`, `path-3`, ... when it already holds files: never overwrite a run."""
    candidate, k = path, 1
    while os.path.isdir(candidate) and os.listdir(candidate):
        k += 1
        candidate = f"{path}-{k}"
    os.makedirs(candidate, exist_ok=True)
    return candidate


def condition_tensors(conditions, device):
    """[(elements, band_gap_class, ordering)] -> the three long tensors the model takes."""
    encoded = [data.encode_condition(*c) for c in conditions]
    return (torch.tensor([z for z, _, _ in encoded], device=device),
            torch.tensor([bg for _, bg, _ in encoded], device=device),
            torch.tensor([m for _, _, m in encoded], device=device))


def sample_in_batches(model, ddpm, conditions, args, device, x_T=None, t_start=None, label="sampling",
                      trajectory=None):
    """Denoise len(conditions) clouds, --batch-size at a time, with a progress line.
    Returns a (N, 3, 128, 3) numpy array in [0, 1]."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out, n, start = [], len(conditions), time.time()
    for lo in range(0, n, args.batch_size):
        hi = min(n, lo + args.batch_size)
        last = [0.0]

        def progress(i, total):
            now = time.time() - start
            if now - last[0] > 5 or i == total:
                last[0] = now
                done = lo + (hi - lo) * i / total
                print(f"\r{label}: {done:6.1f}/{n} structures, step {i}/{total}, "
                      f"{now:5.0f} s elapsed, ~{now / done * (n - done) / 60 if done else 0:4.1f} min left",
                      end="", file=sys.stderr, flush=True)
        clouds = ddpm.sample(model, condition_tensors(conditions[lo:hi], device),
                             x_T=None if x_T is None else x_T[lo:hi].to(device), t_start=t_start,
                             sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                             condition_above=args.condition_above, generator=generator, progress=progress,
                             trajectory=trajectory if lo == 0 else None)
        out.append(clouds.cpu().numpy())
    print(file=sys.stderr)
    return np.concatenate(out), time.time() - start


def decode_all(clouds, element_lists, length_range):
    """Decode every cloud; returns (structures with None where decoding failed, reasons)."""
    structures, reasons = [], []
    for cloud, elements in zip(clouds, element_lists):
        try:
            structures.append(data.decode(cloud, elements, length_range=length_range))
            reasons.append("")
        except ValueError as e:
            structures.append(None)
            reasons.append(str(e))
    return structures, reasons


# ----------------------------------------------------------------------------------------------
# reconstruct (paper Fig. 1, Table 1, Fig. 2)
# ----------------------------------------------------------------------------------------------

PAPER_TABLE1 = dict(efficiency=[88.48, 90.55, 89.40, 70.83, 71.60, 72.02],
                    upper=[3.81, 3.66, 3.57, 10.05, 5.44, 6.44],
                    lower=[-5.12, -5.23, -4.90, -6.50, -3.84, -4.09])


def cmd_reconstruct(args):
    import json
    device = pick_device(args.device)
    model, ckpt = load_checkpoint(checkpoint_for(args), device)
    condition_above_of(ckpt, args)
    length_range = ckpt["length_range"]
    crystals = load_or_fail(args.data)
    rng = np.random.default_rng(args.seed)
    crystals = [crystals[i] for i in rng.permutation(len(crystals))[: args.n]]
    usable = []
    for c in crystals:
        try:
            usable.append((c, data.encode(c.structure, length_range=length_range)))
        except ValueError as e:
            print(f"skipping {c.material_id}: {e}", file=sys.stderr)
    if not usable:
        raise UserError("no structure to reconstruct")
    ddpm = diffusion_of(ckpt)
    t = ddpm.T if args.t is None else args.t
    if not 1 <= t <= ddpm.T:
        raise UserError(f"--t must be between 1 and {ddpm.T}")
    out = fresh_dir(args.out)

    # Forward process to step t (Eq. 3), stored so that the run can be repeated.
    x0 = diffusion.to_model(torch.from_numpy(np.stack([cloud for _, (cloud, _) in usable])))
    g = torch.Generator().manual_seed(args.seed)
    x_t = ddpm.q_sample(x0, torch.full((len(x0),), t - 1), torch.randn(x0.shape, generator=g))
    np.savez_compressed(os.path.join(out, "noised.npz"), x_t=x_t.numpy(), t=t,
                        material_id=[c.material_id for c, _ in usable])
    conditions = [(elements, c.band_gap_class, c.ordering) for c, (_, elements) in usable]
    clouds, seconds = sample_in_batches(model, ddpm, conditions, args, device, x_T=x_t,
                                        t_start=t - 1, label=f"denoising from t = {t}")
    np.savez_compressed(os.path.join(out, "denoised.npz"), clouds=clouds,
                        elements=np.array([" ".join(e) for e, _, _ in conditions]))
    recon, reasons = decode_all(clouds, [e for e, _, _ in conditions], length_range)

    print(f"measuring {len(recon)} pairs (StructureMatcher, CrystalNN) ...", file=sys.stderr, flush=True)
    matcher, strict = evaluate.cdvae_matcher(), evaluate.default_matcher()
    pairs = []
    for (c, _), s, why in zip(usable, recon, reasons):
        row = evaluate.compare_reconstruction(c.structure, s)
        row.update(material_id=c.material_id, formula=c.structure.composition.formula,
                   decode_error=why, rms=evaluate.rms_distance(c.structure, s, matcher),
                   match_default=evaluate.rms_distance(c.structure, s, strict) is not None)
        if s is not None and args.fig2:
            row.update(rms_anonymous=evaluate.rms_anonymous_distance(c.structure, s),
                       crystalnn=evaluate.crystalnn_distance(c.structure, s))
        if s is not None:
            s.to(filename=os.path.join(out, f"{len(pairs):04d}_{c.material_id}.cif"))
        pairs.append(row)

    n = len(pairs)
    same = [p for p in pairs if p["same_count"]]
    matched = [p["rms"] for p in pairs if p["rms"] is not None]
    baseline = evaluate.most_common_count_baseline(
        [p["formula"] for p in pairs], ckpt["train_compositions"])
    lattice_err = np.array([p["lattice_rel_error"] for p in same]).reshape(-1, 3)
    coord_paper = np.concatenate([p["coord_error_paper"] for p in same]).reshape(-1, 3) if same else np.zeros((0, 3))
    coord_ours = np.concatenate([p["coord_error_periodic"] for p in same]).reshape(-1, 3) if same else np.zeros((0, 3))
    columns = list(lattice_err.T) + list(coord_paper.T)
    table = [evaluate.box_statistics(100 * v) for v in columns]
    table_periodic = [evaluate.box_statistics(100 * v) for v in coord_ours.T]
    summary = dict(
        checkpoint=os.path.abspath(args.checkpoint), data=os.path.abspath(args.data), t=t,
        sampler=args.sampler, steps=args.steps, guidance=args.guidance,
        condition_above=args.condition_above, seed=args.seed, n=n,
        seconds=seconds, decoded=sum(s is not None for s in recon),
        atom_count_accuracy=len(same) / n, count_baseline_accuracy=baseline,
        match_rate=len(matched) / n, mean_rms=float(np.mean(matched)) if matched else None,
        match_rate_default=sum(p["match_default"] for p in pairs) / n,
        table1={k: v for k, v in zip("abcxyz", table)},
        table1_periodic_coords={k: v for k, v in zip("xyz", table_periodic)},
    )
    for key in ("rms_anonymous", "crystalnn"):
        values = [p[key] for p in pairs if p.get(key) is not None]
        summary[f"mean_{key}"] = float(np.mean(values)) if values else None
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(summary=summary, pairs=pairs), f, indent=1, default=float)
    write_reconstruction_csv(os.path.join(out, "pairs.csv"), pairs)
    plot_reconstruction(pairs, table, coord_ours, os.path.join(out, "fig1.png"), summary)
    print_reconstruction(summary, table, table_periodic)
    print(f"results: {out}/ (results.json, pairs.csv, fig1.png, noised.npz, denoised.npz, "
          f"{summary['decoded']} CIFs)")


def write_reconstruction_csv(path, pairs):
    import csv
    fields = ["material_id", "formula", "n_original", "n_reconstructed", "same_count", "rms", "match_default",
              "rms_anonymous", "crystalnn", "mean_match_distance", "decode_error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(pairs)


def describe_sampler(sampler, steps, guidance, condition_above, **_):
    """'ddpm, guidance 3' or 'ddim, 100 steps, guidance 3 at steps >= 250, no condition below'."""
    words = (sampler if sampler == "ddpm" else f"ddim, {steps} steps") + f", guidance {guidance:g}"
    return words + (f" at steps >= {condition_above}, no condition below" if condition_above else "")


def print_reconstruction(summary, table, table_periodic):
    n = summary["n"]
    sampler = describe_sampler(**summary)
    print(f"\nReconstruction from t = {summary['t']} of {n} structures ({sampler}, "
          f"{summary['seconds']:.0f} s)")
    print(f"  decoded                       {summary['decoded']:>5}/{n}")
    print(f"  atom count right              {100 * summary['atom_count_accuracy']:6.2f}%   "
          f"(paper: 67.81%; most-common-count baseline: {100 * summary['count_baseline_accuracy']:.2f}%)")
    rms = summary["mean_rms"]
    print(f"  StructureMatcher match        {100 * summary['match_rate']:6.2f}%   "
          f"mean RMS {'-' if rms is None else f'{rms:.4f}'}  (stol 0.5, ltol 0.3, angle_tol 10)")
    print(f"  StructureMatcher() match      {100 * summary['match_rate_default']:6.2f}%   "
          f"(pymatgen's default tolerances: stol 0.3, ltol 0.2, angle_tol 5)")
    for key, name in (("mean_rms_anonymous", "RMS anonymous distance"), ("mean_crystalnn", "CrystalNN fingerprint distance")):
        if summary.get(key) is not None:
            print(f"  mean {name:<25}{summary[key]:8.4f}")
    print("\n  Table 1 (for equal atom counts; errors in %)     a        b        c        x        y        z")
    for key, label in (("efficiency", "Efficiency"), ("upper", "Upper limit"), ("lower", "Lower limit")):
        ours = "".join(f"{row[key] * (100 if key == 'efficiency' else 1):9.2f}" for row in table)
        paper = "".join(f"{v:9.2f}" for v in PAPER_TABLE1[key])
        print(f"  {label:<13} ours                              {ours}")
        print(f"  {'':<13} paper                             {paper}")
    ours = "".join(f"{row['efficiency'] * 100:9.2f}" for row in table_periodic)
    print(f"  Efficiency, minimum-image coordinate error (ours)                        {ours}")


def plot_reconstruction(pairs, table, coord_ours, path, summary):
    """Fig. 1: parity plots of lattice lengths (a) and coordinates (b), the atom-count heatmap
    (c), box plots of the lattice (d) and coordinate (e) errors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    same = [p for p in pairs if p["same_count"]]
    fig, ax = plt.subplots(2, 3, figsize=(14, 8.5))
    ax = ax.ravel()
    if same:
        lo = np.array([p["lattice_original"] for p in same]).ravel()
        hi = np.array([p["lattice_reconstructed"] for p in same]).ravel()
        ax[0].scatter(lo, hi, s=6, alpha=0.5)
        m = max(lo.max(), hi.max())
        ax[0].plot([0, m], [0, m], "k--", lw=0.8)
        co = np.concatenate([p["coords_original"] for p in same]).ravel()
        cr = np.concatenate([p["coords_reconstructed"] for p in same]).ravel()
        ax[1].scatter(co, cr, s=4, alpha=0.3)
        ax[1].plot([0, 1], [0, 1], "k--", lw=0.8)
    ax[0].set(title="a. lattice lengths (equal counts)", xlabel="original (Å)", ylabel="reconstructed (Å)")
    ax[1].set(title="b. fractional coordinates (matched atoms)", xlabel="original", ylabel="reconstructed")
    counts = np.zeros((17, 17))
    for p in pairs:
        counts[min(p["n_reconstructed"], 16), p["n_original"]] += 1
    im = ax[2].imshow(counts, origin="lower", cmap="viridis")
    fig.colorbar(im, ax=ax[2])
    ax[2].set(title=f"c. atom counts: {100 * summary['atom_count_accuracy']:.1f}% on the diagonal",
              xlabel="original", ylabel="reconstructed (0 = not decoded)")
    lattice_err = [100 * np.array([p["lattice_rel_error"][k] for p in same]) for k in range(3)]
    ax[3].boxplot(lattice_err, showfliers=True)
    ax[3].set_xticks([1, 2, 3], ["a", "b", "c"])
    ax[3].set(title="d. lattice length relative error (%)", ylim=(-30, 30))
    coord_paper = [100 * np.concatenate([np.array(p["coord_error_paper"])[:, k] for p in same]) if same else [] for k in range(3)]
    ax[4].boxplot(coord_paper + [100 * coord_ours[:, k] for k in range(3)], showfliers=True)
    ax[4].set_xticks(range(1, 7), ["x", "y", "z", "x*", "y*", "z*"])
    ax[4].set(title="e. coordinate error (% of the cell; * minimum-image)", ylim=(-30, 30))
    rms = [p["rms"] for p in pairs if p["rms"] is not None]
    ax[5].hist(rms, bins=20)
    ax[5].set(title=f"RMS distance of matched pairs ({100 * summary['match_rate']:.1f}% matched)",
              xlabel="get_rms_dist (normalised)")
    fig.suptitle(f"PCCD reconstruction from t = {summary['t']}, {summary['n']} structures")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# generate and evaluate (paper Fig. 3, Table 2)
# ----------------------------------------------------------------------------------------------

NOBLE_GASES = {"He", "Ne", "Ar", "Kr", "Xe", "Rn"}
RADIOACTIVE = {"Tc", "Pm"} | {Element.from_Z(z).symbol for z in range(84, 119)}
RARE_EARTHS = {"Sc", "Y"} | {Element.from_Z(z).symbol for z in range(57, 72)} - {"Pm"}
ALKALINE_EARTHS = {"Be", "Mg", "Ca", "Sr", "Ba"}
TRANSITION_METALS = {e.symbol for e in Element if e.is_transition_metal and e.Z < 80} - RADIOACTIVE
# Batch #3, "commonly used elements": the ten most abundant elements of the Earth's crust
# (O Si Al Fe Ca Na Mg K Ti H) plus the everyday anions and light elements (C N F P S Cl), the
# cheap battery and structural metals (Li Mn Ni Cu Zn). All are well represented in MP-20.
COMMON = {"O", "Si", "Al", "Fe", "Ca", "Na", "Mg", "K", "Ti", "H", "C", "N", "F", "P", "S", "Cl",
          "Li", "Mn", "Ni", "Cu", "Zn"}
POOLS = {
    "all": sorted({Element.from_Z(z).symbol for z in range(1, 84)} - NOBLE_GASES - RADIOACTIVE),
    "rare-earth-oxides": sorted(RARE_EARTHS | ALKALINE_EARTHS | TRANSITION_METALS),  # plus O
    "common": sorted(COMMON),
}


def draw_element_sets(pool, n, rng):
    """n random element sets from one of the paper's three batches: 1-3 elements from the pool,
    or, for batch #2, O plus 1-2 metals."""
    symbols = POOLS[pool]
    sets = []
    for _ in range(n):
        if pool == "rare-earth-oxides":
            sets.append(list(rng.choice(symbols, size=rng.integers(1, 3), replace=False)) + ["O"])
        else:
            sets.append(list(rng.choice(symbols, size=rng.integers(1, 4), replace=False)))
    return [[str(e) for e in s] for s in sets]


def load_reference(path):
    """Training structures for the novelty check, or None (with a warning) when unavailable."""
    path = resolve_path(path)
    if not os.path.exists(path):
        print(f"warning: reference structures not found ({path}); novelty not checked", file=sys.stderr)
        return None
    return [c.structure for c in data.load_structures(path)]


def describe(structure):
    """formula, atoms, space group, density, shortest distance: the columns of summary.csv."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
    try:
        spacegroup = SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_symbol()
    except Exception:
        spacegroup = "?"
    return dict(formula=structure.composition.reduced_formula, n_atoms=len(structure),
                spacegroup=spacegroup, density=round(float(structure.density), 4),
                shortest_distance=round(evaluate.shortest_distance(structure), 4),
                atoms_merged=structure.properties.get("atoms_merged", ""))


def write_screening(out, names, structures, reasons, rows):
    import csv
    fields = ["name", "elements", "formula", "n_atoms", "spacegroup", "density", "shortest_distance",
              "atoms_merged", "decoded", "structural", "compositional", "valid", "unique", "novel", "reason"]
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for name, s, why, row in zip(names, structures, reasons, rows):
            writer.writerow(dict(name=name, reason=why, **row, **(describe(s) if s is not None else {})))


def cmd_generate(args):
    import json
    device = pick_device(args.device)
    if bool(args.elements) == bool(args.pool):
        raise UserError("give either --elements (1-3 symbols) or --pool")
    try:
        if args.elements:
            data.check_elements(args.elements)
    except ValueError as e:
        raise UserError(str(e))
    model, ckpt = load_checkpoint(checkpoint_for(args), device)
    condition_above_of(ckpt, args)
    rng = np.random.default_rng(args.seed)
    if args.elements:
        element_sets = [args.elements] * args.n
    elif args.pool == "train":              # element sets of randomly drawn training crystals
        compositions = rng.choice(ckpt["train_compositions"], size=args.n)
        element_sets = [[e.symbol for e in Composition(c).elements] for c in compositions]
    else:
        element_sets = draw_element_sets(args.pool, args.n, rng)
    element_sets = [data.canonical_order(s) for s in element_sets]   # the slot order of training
    seen = {e.symbol for comp in ckpt["train_compositions"] for e in Composition(comp).elements}
    unseen = sorted({e for s in element_sets for e in s} - seen)
    if unseen:
        print(f"warning: the model never saw {' '.join(unseen)} in training; expect poor structures",
              file=sys.stderr)
    out = fresh_dir(args.out)
    ddpm = diffusion_of(ckpt)
    conditions = [(s, args.band_gap, args.magnetic) for s in element_sets]
    trajectory = {} if args.trajectory else None
    clouds, seconds = sample_in_batches(model, ddpm, conditions, args, device, trajectory=trajectory)
    if trajectory:
        times = sorted(trajectory, reverse=True)
        plot_trajectory(trajectory, element_sets[0], os.path.join(out, "trajectory.png"),
                        times=times[:: max(1, len(times) // 5)] + [times[-1]])
    np.savez_compressed(os.path.join(out, "clouds.npz"), clouds=clouds,   # to decode again later
                        elements=np.array([" ".join(e) for e in element_sets]))
    structures, reasons = decode_all(clouds, element_sets, ckpt["length_range"])
    names = []
    for i, s in enumerate(structures):
        names.append(f"{i:04d}_{s.composition.reduced_formula if s else 'failed'}")
        if s is not None:
            s.to(filename=os.path.join(out, names[-1] + ".cif"))
            s.to(filename=os.path.join(out, names[-1] + ".vasp"), fmt="poscar")
    print(f"screening {sum(s is not None for s in structures)} structures ...", file=sys.stderr, flush=True)
    reference = load_reference(args.reference or ckpt["data"])
    rows, summary = evaluate.screen(structures, reference or [])
    for r, s in zip(rows, element_sets):
        r["elements"] = " ".join(s)
    summary["crystals_with_merges"] = sum(s.properties["atoms_merged"] > 0 for s in structures if s is not None)
    write_screening(out, names, structures, reasons, rows)
    summary.update(seconds=seconds, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                   condition_above=args.condition_above,
                   seed=args.seed, checkpoint=os.path.abspath(args.checkpoint), novelty_checked=reference is not None)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nGenerated {args.n} crystals in {seconds:.0f} s "
          f"({describe_sampler(**summary)})")
    print(evaluate.format_screening(summary))
    print(f"structures, summary.csv and the raw clouds (clouds.npz): {out}/")


def cmd_evaluate(args):
    try:
        crystals = data.load_structures(args.folder, only_encodable=False)
    except (OSError, ValueError) as e:
        raise UserError(str(e))
    if not crystals:
        raise UserError(f"no CIF or POSCAR structure in {args.folder}")
    reference = load_reference(args.reference)
    structures = [c.structure for c in crystals]
    rows, summary = evaluate.screen(structures, reference or [])
    for r, c in zip(rows, crystals):
        r.update(name=c.material_id, **describe(c.structure))
    import csv
    path = os.path.join(args.folder, "screening.csv") if args.csv is None else args.csv
    if os.path.exists(path):
        raise UserError(f"{path} exists; name another with --csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    print(evaluate.format_screening(summary))
    print(f"per-structure flags: {path}")


# ----------------------------------------------------------------------------------------------
# download (the paper's 52,028 Materials Project crystals) and the teaching figures (Fig. S1, S2)
# ----------------------------------------------------------------------------------------------

MP_FIELDS = ["material_id", "structure", "band_gap", "ordering", "formation_energy_per_atom",
             "energy_above_hull"]


def cmd_download(args):
    from pymatgen.core import SETTINGS
    from pymatgen.ext.matproj import MPRester
    key = args.api_key or os.environ.get("MP_API_KEY") or SETTINGS.get("PMG_MAPI_KEY")
    if not key:
        raise UserError("no Materials Project API key: pass --api-key, set MP_API_KEY, or put "
                        "PMG_MAPI_KEY in ~/.config/.pmgrc.yaml (keys: materialsproject.org/dashboard)")
    paths = {split: os.path.join(args.out, f"mp_{split}.csv") for split in ("train", "val", "test")}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing:
        raise UserError(f"{existing[0]} exists; choose another --out")
    print(f"querying the Materials Project summary endpoint (<= {data.MAX_ELEMENTS} elements, "
          f"<= {data.MAX_SITES} sites); this takes minutes ...", file=sys.stderr, flush=True)
    try:
        with MPRester(key) as mpr:
            documents = mpr.summary_search(nelements_max=data.MAX_ELEMENTS, nsites_max=data.MAX_SITES,
                                           _fields=MP_FIELDS)
    except Exception as e:  # bad key, no network, API error: one line, no traceback
        raise UserError(f"the Materials Project query failed: {str(e).splitlines()[0][:300]}")
    rows = data.mp_documents_to_rows(documents)
    os.makedirs(args.out, exist_ok=True)
    for split, path in paths.items():
        chosen = [r for r in rows if data.split_of(r["material_id"]) == split]
        data.write_csv(path, chosen)
        print(f"{path}: {len(chosen)} crystals")


def cmd_show(args):
    """Fig. S1: the three channels of one crystal's cloud."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    crystals = load_or_fail(args.structure)
    structure = crystals[0].structure
    length_range = load_checkpoint(args.checkpoint)[1]["length_range"] if args.checkpoint else data.DEFAULT_LENGTH_RANGE
    try:
        cloud, elements = data.encode(structure, length_range=length_range)
    except ValueError as e:
        raise UserError(str(e))
    fig, axes = plt.subplots(1, 3, figsize=(11, 5), sharey=True)
    titles = ["channel 0: fractional x, y, z", "channel 1: element slot " + " / ".join(elements),
              "channel 2: angles (rows 0-63), lengths (64-127)"]
    for ax, channel, title in zip(axes, cloud, titles):
        im = ax.imshow(channel, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=title, xticks=[0, 1, 2], xlabel="column")
    axes[1].set_xticks([0, 1, 2], [*elements, "", ""][:3])
    axes[0].set_ylabel("point (atom i fills 128 // n consecutive rows)")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"{structure.composition.reduced_formula}: the (3, 128, 3) PCCD cloud (paper Fig. S1)")
    out = args.out or os.path.splitext(os.path.basename(args.structure))[0] + "_cloud.png"
    if os.path.exists(out):
        raise UserError(f"{out} exists; name another with --out")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_trajectory(trajectory, elements, path, times=(999, 750, 500, 250, 100, 0)):
    """Fig. S2: one sample's points, coloured by element, as the noise is removed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    times = sorted({t for t in times if t in trajectory}, reverse=True)
    fig = plt.figure(figsize=(3.2 * len(times), 3.6))
    for k, t in enumerate(times):
        cloud = trajectory[t].numpy()
        ax = fig.add_subplot(1, len(times), k + 1, projection="3d")
        slot = cloud[1, :, : len(elements)].argmax(1)
        for j, symbol in enumerate(elements):
            p = cloud[0][slot == j]
            ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=6, label=symbol)
        ax.set(title=f"t = {t}", xlim=(0, 1), ylim=(0, 1), zlim=(0, 1), xticks=[], yticks=[], zticks=[])
    fig.axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Generation of one crystal: points coloured by element (paper Fig. S2)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------

def cmd_bench(args):
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = unet.UNet().to(device)
    ddpm = diffusion.Diffusion()
    B = args.batch_size
    x = torch.randn(B, 3, 128, 3, device=device)
    condition = (torch.randint(1, 84, (B, 3), device=device), torch.zeros(B, dtype=torch.long, device=device),
                 torch.zeros(B, dtype=torch.long, device=device))
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)

    def timed(fn, repeats):
        fn()                                                             # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0) / repeats

    def train_step():
        loss = ddpm.loss(model, x, *condition)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_ms = timed(train_step, args.repeats)
    model.eval()
    with torch.no_grad():
        guided_ms = timed(lambda: ddpm.predict_noise(model, x, 500, condition, guidance=2.0), args.repeats)
    print(f"device {device} ({torch.get_num_threads()} threads), batch {B}")
    print(f"parameters                           {unet.count_parameters(model) / 1e6:8.2f} M   (original PCCD U-Net: 163.7 M)")
    print(f"training step                        {train_ms:8.1f} ms")
    print(f"guided sampling step (2 passes)      {guided_ms:8.1f} ms   (original: ~2500 ms on a 2-core CPU)")
    print(f"one structure, 1000 DDPM steps       {guided_ms * 1000 / B / 1000:8.2f} s    (original: ~78 s)")
    print(f"one structure, {args.ddim_steps} DDIM steps         {guided_ms * args.ddim_steps / B / 1000:8.3f} s")


# ----------------------------------------------------------------------------------------------
# roundtrip
# ----------------------------------------------------------------------------------------------

def cmd_roundtrip(args):
    print(f"{'data':<40} {'noise':>6} {'matched':>13} {'rate':>8} {'ms/decode':>10}")
    for path in args.data:
        crystals = load_or_fail(path)
        for noise in args.noise:
            r = evaluate.roundtrip(crystals, noise=noise, seed=args.seed)
            print(f"{os.path.relpath(path):<40} {noise:>6g} {r['matched']:>6}/{r['n']:<6} "
                  f"{100 * r['match_rate']:>7.2f}% {r['ms_per_decode']:>10.1f}", flush=True)
            if r["failures"]:
                print(f"    not matched: {' '.join(r['failures'][:8])}"
                      f"{' ...' if len(r['failures']) > 8 else ''}")


# ----------------------------------------------------------------------------------------------

def add_sampling_arguments(p, batch_size=256):
    p.add_argument("--checkpoint", default=None, help=f"default: {DEFAULT_RUN}/{CHECKPOINT} if you "
                   f"trained one, else the shipped {os.path.relpath(SHIPPED_CHECKPOINT, HERE)}")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: ancestral sampling over every step (Eq. 6, the paper's); ddim: "
                   "deterministic, --steps steps (default %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps (default 100)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale w: "
                   "eps = eps_uncond + w (eps_cond - eps_uncond); 1 = conditional model only, 0 = "
                   "unconditional only, each one network pass (default %(default)s, the best of "
                   "1, 2, 3, 5 measured: see README)")
    p.add_argument("--condition-above", type=int, metavar="STEP",
                   help="use the condition (with guidance w) only at steps >= STEP; below it the "
                   "network denoises without it, in one pass (default: what the checkpoint was "
                   "trained with, 0 -- every step -- unless train --condition-above said otherwise)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="clouds denoised at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pccd.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("train", help="train the diffusion model (Table S1; ~10 min on a 2-core CPU)",
                       description="Train PCCD's U-Net to predict the noise (Eq. S4, L1 loss) on the "
                       "encoded crystals. Writes OUT/checkpoint.pt (atomically, every --save-every "
                       "steps and at the end) and OUT/loss.png (Fig. S4).")
    p.add_argument("--data", default=BUNDLED_TRAIN, help="training crystals: CDVAE CSV, folder or "
                   "file (default: the bundled MP-20 train split; the val split stays unseen)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="quick: 6000 steps, "
                   "batch 32, constant lr 2e-3 (~9 min on a 2-core CPU). hour: 8600 steps, batch 128, "
                   "cosine-decayed lr 2e-3 (~45 min; the shipped checkpoint). Both predict v and use "
                   "the condition only at steps >= 250. The flags below override them.")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--batch-size", type=int, help="crystals per step (Table S1: 128)")
    p.add_argument("--lr", type=float, help="Adam learning rate (Table S1 has 1e-4, which learns much "
                   "slower on this data: see README)")
    p.add_argument("--schedule", choices=["constant", "cosine"], help="learning rate over the run: "
                   "constant, or cosine-decayed to 0 at --steps")
    p.add_argument("--ema", type=float, default=0.995, help="decay of the weights' moving average "
                   "used for sampling (default 0.995)")
    p.add_argument("--cond-drop", type=float, default=0.2, help="probability of dropping the "
                   "condition, for classifier-free guidance (default 0.2)")
    p.add_argument("--property-drop", type=float, default=0.3, help="probability of replacing the "
                   "band-gap class, and separately the magnetic ordering, by 'unknown', so that "
                   "'unknown' means 'any' when sampling (default 0.3)")
    p.add_argument("--prediction", choices=["eps", "v"], help="what the network predicts: eps, the "
                   "noise (the paper's), or v = sqrt(abar) eps - sqrt(1 - abar) x0 (default: the preset's)")
    p.add_argument("--translate", action=argparse.BooleanOptionalAction, help="augment every "
                   "batch by random periodic translations of each crystal (default off)")
    p.add_argument("--translate-below", type=int, metavar="STEP", help="translate only the crystals "
                   "noised to a diffusion step below STEP (implies --translate), so that the high-noise steps, "
                   "where the network decides what crystal it makes, keep the training crystals' own frame "
                   "(default 1000: all steps)")
    p.add_argument("--translate-share", type=float, metavar="P", help="translate only a random share P "
                   "of the crystals (of those below --translate-below, if given; implies --translate), so that "
                   "the network still sees the training crystals in their own frame at every step (default 1: all)")
    p.add_argument("--condition-above", type=int, metavar="STEP", help="use the condition only at "
                   "steps >= STEP: below it the condition is always dropped, so those steps learn to "
                   "denoise any crystal without being told which; sampling then does the same "
                   "(default: the preset's, 0: every step)")
    p.add_argument("--widths", type=int, nargs=3, metavar="W", help="U-Net channels at 128, 64 "
                   f"and 32 points (default {' '.join(map(str, unet.UNetConfig.widths))})")
    p.add_argument("--out", default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt up to --steps")
    p.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("export", help="a small sampling-only copy of a run's checkpoint (how the "
                       "shipped one was made)", description=cmd_export.__doc__)
    p.add_argument("source", metavar="RUN", help="run folder or checkpoint.pt (e.g. runs/hour)")
    p.add_argument("--out", required=True, help="file to write (never overwritten)")
    p.add_argument("--float32", action="store_true", help="keep full precision")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("reconstruct", help="the paper's reconstruction experiment (Fig. 1, Table 1)",
                       description="Noise N structures to step t with the forward process (stored in "
                       "noised.npz), denoise them with the model conditioned on their own elements, "
                       "decode, and compare with the originals: atom counts, Table 1's box-plot "
                       "statistics, StructureMatcher match rate and RMS, Fig. 2's distances, Fig. 1.")
    p.add_argument("--data", default=BUNDLED_TRAIN, help="structures to reconstruct (default: the "
                   "training split, as the paper; use datasets/mp20_val.csv for unseen ones)")
    p.add_argument("--n", type=int, default=256, help="how many structures (default 256)")
    p.add_argument("--t", type=int, default=None, help="noise to step t, 1..1000 (default 1000 = T)")
    add_sampling_arguments(p)
    p.add_argument("--no-fig2", dest="fig2", action="store_false",
                   help="skip the slower Fig. 2 distances (RMS anonymous, CrystalNN)")
    p.add_argument("--out", default=os.path.join("runs", "reconstruct"),
                   help="results folder; a new -2, -3 ... is made if it exists")
    p.set_defaults(run=cmd_reconstruct)

    p = sub.add_parser("generate", help="sample new crystals of chosen elements and screen them",
                       description="Sample crystals for an element set (--elements) or for random "
                       "sets from one of the paper's three batches (--pool), write one CIF and one "
                       "POSCAR each and summary.csv, and screen them: structural and compositional "
                       "validity, uniqueness, novelty against the training data (Table 2).")
    p.add_argument("--elements", nargs="+", metavar="EL", help="1-3 element symbols, e.g. Mg Mn O")
    p.add_argument("--pool", choices=sorted(POOLS) + ["train"], help="train: the element sets of "
                   "randomly drawn training crystals. all: every element but noble gases and "
                   "radioactive ones; rare-earth-oxides: O plus 1-2 rare-earth, alkaline-earth or "
                   "transition metals; common: " + " ".join(POOLS["common"]))
    p.add_argument("--n", type=int, default=64, help="how many crystals (default 64)")
    p.add_argument("--band-gap", choices=data.BAND_GAP_CLASSES, default="unknown",
                   help="metal, small (< 1.5 eV), large (>= 1.5 eV) or unknown (default)")
    p.add_argument("--magnetic", choices=data.MAGNETIC_ORDERINGS, default="unknown",
                   help="magnetic ordering (default unknown)")
    p.add_argument("--reference", default=None, help="training structures for the novelty check "
                   "(default: the checkpoint's training data)")
    add_sampling_arguments(p)
    p.add_argument("--trajectory", action="store_true", help="also draw the first sample's points "
                   "at several timesteps into trajectory.png (Fig. S2)")
    p.add_argument("--out", default=os.path.join("runs", "generate"),
                   help="output folder; a new -2, -3 ... is made if it exists")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("download", help="rebuild the paper's dataset from the Materials Project",
                       description="Query the Materials Project (pymatgen's MPRester, summary "
                       "endpoint) for every crystal with <= 3 elements and <= 16 sites, with band "
                       "gap, magnetic ordering, formation energy and energy above hull, and write "
                       "OUT/mp_train.csv, mp_val.csv, mp_test.csv (80/10/10, split by a hash of "
                       "the material id). Needs an API key and network access.")
    p.add_argument("--api-key", help="Materials Project API key (default: $MP_API_KEY or "
                   "pymatgen's PMG_MAPI_KEY setting)")
    p.add_argument("--out", default="datasets", help="folder for the CSV files (default %(default)s)")
    p.set_defaults(run=cmd_download)

    p = sub.add_parser("show", help="draw the three channels of a crystal's cloud (Fig. S1)")
    p.add_argument("structure", help="a CIF/POSCAR file (or a CSV: its first usable row)")
    p.add_argument("--checkpoint", default=None, help="use this model's length range")
    p.add_argument("--out", default=None, help="PNG path (default NAME_cloud.png)")
    p.set_defaults(run=cmd_show)

    p = sub.add_parser("evaluate", help="screen any folder of CIF/POSCAR files (Table 2)",
                       description="Screen crystals from any generator: structural and compositional "
                       "validity, uniqueness, and novelty against --reference.")
    p.add_argument("folder", help="folder of CIF/POSCAR files (or one file, or a CDVAE CSV)")
    p.add_argument("--reference", default=BUNDLED_TRAIN, help="training structures (default: %(default)s)")
    p.add_argument("--csv", default=None, help="where to write the flags (default FOLDER/screening.csv)")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("bench", help="parameter count and milliseconds per training/sampling step")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ddim-steps", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("roundtrip", help="encode -> decode every structure and match it back",
                       description="Encode each structure as a (3, 128, 3) point cloud, optionally "
                       "add Gaussian noise, decode it, and count how many decode to the same "
                       "crystal (pymatgen StructureMatcher, default tolerances).")
    p.add_argument("--data", nargs="+", default=[BUNDLED_TRAIN, BUNDLED_VAL],
                   help="CSV files, folders or structure files (default: the bundled MP-20 sample)")
    p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.01, 0.02],
                   help="std of Gaussian noise added to the cloud, in its [0, 1] units")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_roundtrip)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except UserError as e:
        print(f"pccd.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
