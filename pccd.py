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

Threads: torch uses every core. Its waiting threads sleep rather than spin (OMP_WAIT_POLICY=
PASSIVE, set here unless the environment says otherwise), so a laptop busy with something else
slows PCCD down instead of stalling it; --threads 1 is faster still on a busy 2-core machine.
"""
import argparse
import copy
import json
import os
import sys
import time

# Both must be set before torch and spglib load. spglib (under pymatgen's space-group analysis)
# prints "spglib: ... failed." for odd cells while screening; the screening handles them. OpenMP
# threads that spin while waiting thrash when another program is busy (see README, Threads).
os.environ.setdefault("SPGLIB_WARNING", "OFF")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from pymatgen.core import Composition

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

# Training presets: Table S1 where measurements kept it, our values where they did not (README,
# "Training"). A flag given on the command line overrides the preset.
BOTH_PRESETS = dict(data="datasets/mp20_train.csv", prediction="v", condition_above=250,
                    property_drop=0.3, translate=False, widths=list(unet.UNetConfig.widths), seed=0,
                    guidance=3.0)          # the guidance scale sampling uses by default
PRESETS = {
    "quick": BOTH_PRESETS | dict(steps=6000, batch_size=32, lr=2e-3, schedule="constant"),
    "hour": BOTH_PRESETS | dict(steps=8600, batch_size=128, lr=2e-3, schedule="cosine"),
}
EMA_DECAY = 0.995      # the moving average of the weights that sampling uses
SAVE_EVERY = 250       # steps between checkpoints (and one at the end)


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


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything needed to sample later, written atomically
# ----------------------------------------------------------------------------------------------
# A checkpoint is a dict: `ema` (the weights sampling uses), `model_config`, `length_range`,
# `sampling` (how to sample: prediction, T, condition_above, guidance), `settings` (how it was
# trained), `train_ids` and `train_compositions` (for the count baseline and novelty), `losses`,
# `step`; a run's own also `model`, `optimizer` and `rng`, so that --resume continues exactly.

def save_checkpoint(path, state):
    """Write to a temporary file and rename it, so an interrupted run never leaves a broken one."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
        model.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})   # fp16 -> fp32
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise UserError(f"{path} is not a PCCD checkpoint ({type(e).__name__}: {e})")
    if "sampling" not in ckpt:
        raise UserError(f"{path} was written by an earlier PCCD (no 'sampling' entry): train it again")
    return model.eval(), ckpt


def sampling_entry(settings):
    """The checkpoint's `sampling` entry: what a sampler (or a port) must know of the network."""
    return dict(prediction=settings["prediction"], T=diffusion.T,
                condition_above=settings["condition_above"], guidance=settings["guidance"])


def sampling_of(ckpt, args):
    """The diffusion process of a checkpoint's network; --guidance and --condition-above default
    to its `sampling` entry."""
    entry = ckpt["sampling"]
    args.guidance = entry["guidance"] if args.guidance is None else args.guidance
    args.condition_above = entry["condition_above"] if args.condition_above is None else args.condition_above
    return diffusion.Diffusion(T=entry["T"], prediction=entry["prediction"])


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


# ----------------------------------------------------------------------------------------------
# train (paper Table S1, Eq. S4, Fig. S4)
# ----------------------------------------------------------------------------------------------

def resolve_settings(args, resumed):
    """Every training setting, decided here: a flag given on the command line, else the resumed
    run's own setting, else the preset's."""
    earlier = resumed["settings"] if resumed else {}
    preset = args.preset or earlier.get("preset", "quick")
    given = {k: getattr(args, k) for k in PRESETS[preset] if getattr(args, k, None) is not None}
    if "data" in given:
        given["data"] = portable_path(given["data"])
    return {**PRESETS[preset], **earlier, **given, "preset": preset}


def learning_rate(settings, step):
    """The learning rate at `step`: constant, or cosine-decayed from lr to 0 over the run."""
    if settings["schedule"] == "cosine":
        return settings["lr"] * 0.5 * (1 + np.cos(np.pi * step / settings["steps"]))
    return settings["lr"]


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
    A crystal has no origin, so the shifted cloud is the same crystal. x0 is in the model's
    range [-1, 1], shape (B, 3, 128, 3); only channel 0 moves."""
    shift = torch.rand(len(x0), 1, 3)
    positions = (diffusion.from_model(x0[:, 0]) + shift) % 1.0
    return torch.cat([diffusion.to_model(positions)[:, None], x0[:, 1:]], 1)


def cmd_train(args):
    path = os.path.join(args.out, CHECKPOINT)
    if os.path.exists(path) and not args.resume:
        raise UserError(f"{path} exists: continue it with --resume, or choose another --out")
    resumed = load_checkpoint(path)[1] if args.resume else None
    if resumed and "optimizer" not in resumed:
        raise UserError(f"{path} is an exported, sampling-only checkpoint and cannot be resumed: "
                        f"resume the run it was exported from, or train a new one")
    s = resolve_settings(args, resumed)
    device = pick_device(args.device)
    crystals = load_or_fail(resolve_path(s["data"]))
    length_range = resumed["length_range"] if resumed else data.fit_length_range([c.structure for c in crystals])
    clouds, elements, band_gap, magnetic = map(torch.from_numpy, data.encode_dataset(crystals, length_range))
    x0_all = diffusion.to_model(clouds)                                  # (N, 3, 128, 3) in [-1, 1]

    torch.manual_seed(s["seed"])
    config = unet.UNetConfig(widths=tuple(s["widths"]))
    model = unet.UNet(config).to(device)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=s["lr"], betas=(0.9, 0.99))   # Table S1
    batches = torch.Generator().manual_seed(s["seed"])                   # which crystals, per step
    ddpm = diffusion.Diffusion(prediction=s["prediction"])
    step, losses = 0, []
    if resumed:
        model.load_state_dict(resumed["model"]), ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, losses = resumed["step"], resumed["losses"]
        torch.set_rng_state(resumed["rng"]["torch"]), batches.set_state(resumed["rng"]["batches"])
    print(f"training a {unet.count_parameters(model) / 1e6:.2f} M-parameter U-Net on {len(crystals)} "
          f"crystals, device {device}, steps {step} -> {s['steps']}, batch {s['batch_size']}, lr "
          f"{s['lr']:g} ({s['schedule']}), predicting {s['prediction']}, no condition below step "
          f"{s['condition_above']}{', random translations' if s['translate'] else ''}", flush=True)

    def state():
        return dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                    rng=dict(torch=torch.get_rng_state(), batches=batches.get_state()),
                    step=step, losses=losses, model_config=config.to_dict(), length_range=length_range,
                    settings=s, sampling=sampling_entry(s), train_ids=[c.material_id for c in crystals],
                    train_compositions=[c.structure.composition.formula for c in crystals])

    os.makedirs(args.out, exist_ok=True)
    progress = Progress(s["steps"], "step", done=step)
    model.train()
    while step < s["steps"]:
        idx = torch.randint(0, len(x0_all), (s["batch_size"],), generator=batches)
        bg, mag = drop_properties(band_gap[idx], magnetic[idx], s["property_drop"])
        x0 = translate_randomly(x0_all[idx]) if s["translate"] else x0_all[idx]
        t = torch.randint(0, ddpm.T, (len(idx),), device=device)        # each crystal's step
        # Below condition_above the condition is always dropped: those steps learn to denoise
        # any crystal without being told which, as sampling then runs them.
        cond_drop = torch.where(t < s["condition_above"], 1.0, diffusion.COND_DROP)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(s, step)
        loss = ddpm.loss(model, x0.to(device), elements[idx].to(device), bg.to(device),
                         mag.to(device), cond_drop, t=t)                  # Eq. S4 (on eps or v)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - EMA_DECAY)
        step += 1
        losses.append(loss.item())
        progress.update(1, f"loss {np.mean(losses[-50:]):.4f}", out=sys.stdout)
        if step % SAVE_EVERY == 0 or step == s["steps"]:
            save_checkpoint(path, state())
    evaluate.plot_loss(losses, os.path.join(args.out, "loss.png"))
    print(f"checkpoint: {path}\nloss curve: {os.path.join(args.out, 'loss.png')}  (final loss, mean "
          f"of last 50 steps: {np.mean(losses[-50:]):.4f}; {progress.done - progress.first} steps in "
          f"{progress.elapsed() / 60:.1f} min)")


def cmd_export(args):
    """A run's checkpoint -> a small file for sampling only: the EMA weights (half precision
    unless --float32) and what sampling needs (model configuration, length range, `sampling`,
    `settings`, the training set's identities); no optimizer state, so it cannot be resumed."""
    if os.path.exists(args.out):
        raise UserError(f"{args.out} exists: remove it or choose another --out")
    _, ckpt = load_checkpoint(args.source)
    dtype = torch.float32 if args.float32 else torch.float16
    small = {k: ckpt[k] for k in ("model_config", "length_range", "sampling", "settings", "train_ids",
                                  "train_compositions", "losses", "step")}
    small["ema"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint(args.out, small)
    golden = os.path.splitext(args.out)[0] + "_golden.npz"
    model, _ = load_checkpoint(args.out)
    np.savez_compressed(golden, **diffusion.golden_tensors(model, small["sampling"]))
    print(f"{args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB, EMA weights in {str(dtype)[6:]}, "
          f"step {small['step']}; {golden}: golden tensors for checking a port")



# ----------------------------------------------------------------------------------------------
# Shared by reconstruct and generate
# ----------------------------------------------------------------------------------------------

class Progress:
    """A progress line every 10 seconds and at the end: done / total, time spent and left."""

    def __init__(self, total, unit, done=0):
        self.total, self.unit, self.first, self.done = total, unit, done, done
        self.start, self.last = time.time(), 0.0

    def elapsed(self):
        return time.time() - self.start

    def update(self, n, note="", out=sys.stderr):
        self.done += n
        now = self.elapsed()
        if now - self.last > 10 or self.done >= self.total:
            self.last = now
            left = now / (self.done - self.first) * (self.total - self.done) / 60
            print(f"{self.unit} {self.done:>6.0f}/{self.total}  {note}  {now:5.0f} s elapsed, "
                  f"{left:5.1f} min left", file=out, flush=True)


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
    return tuple(torch.tensor(column, device=device) for column in zip(*encoded))


def sample_in_batches(model, ddpm, conditions, args, device, x_T=None, t_start=None, trajectory=None):
    """Denoise len(conditions) clouds, --batch-size at a time, with a progress line.
    Returns (a (N, 3, 128, 3) numpy array in [0, 1], seconds)."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    n, out = len(conditions), []
    progress = Progress(n, "structures")
    for lo in range(0, n, args.batch_size):
        hi = min(n, lo + args.batch_size)
        clouds = ddpm.sample(model, condition_tensors(conditions[lo:hi], device), guidance=args.guidance,
                             condition_above=args.condition_above, sampler=args.sampler, steps=args.steps,
                             x_T=None if x_T is None else x_T[lo:hi].to(device), t_start=t_start,
                             generator=generator, progress=lambda i, steps: progress.update((hi - lo) / steps),
                             trajectory=trajectory if lo == 0 else None)
        out.append(clouds.cpu().numpy())
    return np.concatenate(out), progress.elapsed()


def describe_sampler(sampler, steps, guidance, condition_above, **_):
    """'ddpm, guidance 3' or 'ddim, 100 steps, guidance 3 at steps >= 250, no condition below'."""
    words = (sampler if sampler == "ddpm" else f"ddim, {steps} steps") + f", guidance {guidance:g}"
    return words + (f" at steps >= {condition_above}, no condition below" if condition_above else "")


# ----------------------------------------------------------------------------------------------
# reconstruct (paper Fig. 1, Table 1, Fig. 2)
# ----------------------------------------------------------------------------------------------

def cmd_reconstruct(args):
    device = pick_device(args.device)
    model, ckpt = load_checkpoint(checkpoint_for(args), device)
    ddpm = sampling_of(ckpt, args)
    t = ddpm.T if args.t is None else args.t
    if not 1 <= t <= ddpm.T:
        raise UserError(f"--t must be between 1 and {ddpm.T}")
    length_range = ckpt["length_range"]
    crystals = load_or_fail(args.data)
    rng = np.random.default_rng(args.seed)
    crystals = [crystals[i] for i in rng.permutation(len(crystals))[: args.n]]
    usable = []
    for c in crystals:
        try:
            usable.append((c, *data.encode(c.structure, length_range=length_range)))
        except ValueError as e:
            print(f"skipping {c.material_id}: {e}", file=sys.stderr)
    if not usable:
        raise UserError("no structure to reconstruct")
    out = fresh_dir(args.out)

    # Forward process to step t (Eq. 3), stored so that the run can be repeated.
    x0 = diffusion.to_model(torch.from_numpy(np.stack([cloud for _, cloud, _ in usable])))
    g = torch.Generator().manual_seed(args.seed)
    x_t = ddpm.q_sample(x0, torch.full((len(x0),), t - 1), torch.randn(x0.shape, generator=g))
    np.savez_compressed(os.path.join(out, "noised.npz"), x_t=x_t.numpy(), t=t,
                        material_id=[c.material_id for c, _, _ in usable])
    conditions = [(elements, c.band_gap_class, c.ordering) for c, _, elements in usable]
    clouds, seconds = sample_in_batches(model, ddpm, conditions, args, device, x_T=x_t, t_start=t - 1)
    np.savez_compressed(os.path.join(out, "denoised.npz"), clouds=clouds,
                        elements=np.array([" ".join(e) for e, _, _ in conditions]))
    recon, reasons = data.decode_all(clouds, [e for e, _, _ in conditions], length_range)

    print(f"measuring {len(recon)} pairs (StructureMatcher{', CrystalNN' if args.fig2 else ''}) ...",
          file=sys.stderr, flush=True)
    pairs = []
    for (c, _, _), s, why in zip(usable, recon, reasons):
        pairs.append(evaluate.compare_reconstruction(c.structure, s, fig2=args.fig2)
                     | dict(material_id=c.material_id, decode_error=why))
        if s is not None:
            s.to(filename=os.path.join(out, f"{len(pairs) - 1:04d}_{c.material_id}.cif"))
    summary = dict(checkpoint=os.path.abspath(args.checkpoint), data=os.path.abspath(args.data), t=t,
                   sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                   condition_above=args.condition_above, seed=args.seed, seconds=seconds)
    summary |= evaluate.summarise_reconstruction(pairs, ckpt["train_compositions"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(summary=summary, pairs=pairs), f, indent=1, default=float)
    data.write_csv(os.path.join(out, "pairs.csv"), pairs, evaluate.PAIR_FIELDS)
    evaluate.plot_reconstruction(pairs, summary, os.path.join(out, "fig1.png"))
    print(f"\nReconstruction from t = {t} of {summary['n']} structures ({describe_sampler(**summary)}, "
          f"{seconds:.0f} s)")
    print(evaluate.format_reconstruction(summary))
    print(f"results: {out}/ (results.json, pairs.csv, fig1.png, noised.npz, denoised.npz, "
          f"{summary['decoded']} CIFs)")


# ----------------------------------------------------------------------------------------------
# generate and evaluate (paper Fig. 3, Table 2)
# ----------------------------------------------------------------------------------------------

SCREENING_FIELDS = ["name", "elements", "formula", "n_atoms", "spacegroup", "density", "shortest_distance",
                    "atoms_merged", "decoded", "structural", "compositional", "valid", "unique", "novel",
                    "reason"]


def load_reference(path):
    """Training structures for the novelty check, or None (with a warning) when unavailable."""
    path = resolve_path(path)
    if not os.path.exists(path):
        print(f"warning: reference structures not found ({path}); novelty not checked", file=sys.stderr)
        return None
    return [c.structure for c in data.load_structures(path)]


def cmd_generate(args):
    device = pick_device(args.device)
    if bool(args.elements) == bool(args.pool):
        raise UserError("give either --elements (1-3 symbols) or --pool")
    try:
        if args.elements:
            data.check_elements(args.elements)
    except ValueError as e:
        raise UserError(str(e))
    model, ckpt = load_checkpoint(checkpoint_for(args), device)
    ddpm = sampling_of(ckpt, args)
    rng = np.random.default_rng(args.seed)
    if args.elements:
        element_sets = [args.elements] * args.n
    elif args.pool == "train":              # element sets of randomly drawn training crystals
        compositions = rng.choice(ckpt["train_compositions"], size=args.n)
        element_sets = [[e.symbol for e in Composition(c).elements] for c in compositions]
    else:
        element_sets = data.draw_element_sets(args.pool, args.n, rng)
    element_sets = [data.canonical_order(s) for s in element_sets]   # the slot order of training
    seen = {e.symbol for comp in ckpt["train_compositions"] for e in Composition(comp).elements}
    unseen = sorted({e for s in element_sets for e in s} - seen)
    if unseen:
        print(f"warning: the model never saw {' '.join(unseen)} in training; expect poor structures",
              file=sys.stderr)
    out = fresh_dir(args.out)
    conditions = [(s, args.band_gap, args.magnetic) for s in element_sets]
    trajectory = {} if args.trajectory else None
    clouds, seconds = sample_in_batches(model, ddpm, conditions, args, device, trajectory=trajectory)
    if trajectory:
        times = sorted(trajectory, reverse=True)
        evaluate.plot_trajectory(trajectory, element_sets[0], os.path.join(out, "trajectory.png"),
                        times=times[:: max(1, len(times) // 5)] + [times[-1]])
    np.savez_compressed(os.path.join(out, "clouds.npz"), clouds=clouds,   # to decode again later
                        elements=np.array([" ".join(e) for e in element_sets]))
    structures, reasons = data.decode_all(clouds, element_sets, ckpt["length_range"])
    names = []
    for i, s in enumerate(structures):
        names.append(f"{i:04d}_{s.composition.reduced_formula if s else 'failed'}")
        if s is not None:
            s.to(filename=os.path.join(out, names[-1] + ".cif"))
            s.to(filename=os.path.join(out, names[-1] + ".vasp"), fmt="poscar")
    print(f"screening {sum(s is not None for s in structures)} structures ...", file=sys.stderr, flush=True)
    reference = load_reference(args.reference or ckpt["settings"]["data"])
    rows, summary = evaluate.screen(structures, reference or [])
    for row, name, s, why, elements in zip(rows, names, structures, reasons, element_sets):
        row.update(name=name, elements=" ".join(elements), reason=why,
                   **(evaluate.describe(s) if s is not None else {}))
    data.write_csv(os.path.join(out, "summary.csv"), rows, SCREENING_FIELDS)
    summary["crystals_with_merges"] = sum(s.properties["atoms_merged"] > 0 for s in structures if s is not None)
    summary.update(seconds=seconds, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                   condition_above=args.condition_above, seed=args.seed,
                   checkpoint=os.path.abspath(args.checkpoint), novelty_checked=reference is not None)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nGenerated {args.n} crystals in {seconds:.0f} s ({describe_sampler(**summary)})")
    print(evaluate.format_screening(summary))
    print(f"structures, summary.csv and the raw clouds (clouds.npz): {out}/")


def cmd_evaluate(args):
    try:
        crystals = data.load_structures(args.folder, only_encodable=False)
    except (OSError, ValueError) as e:
        raise UserError(str(e))
    if not crystals:
        raise UserError(f"no CIF or POSCAR structure in {args.folder}")
    path = os.path.join(args.folder, "screening.csv") if args.csv is None else args.csv
    if os.path.exists(path):
        raise UserError(f"{path} exists; name another with --csv")
    reference = load_reference(args.reference)
    rows, summary = evaluate.screen([c.structure for c in crystals], reference or [])
    for row, c in zip(rows, crystals):
        row.update(name=c.material_id, **evaluate.describe(c.structure))
    data.write_csv(path, rows, [f for f in SCREENING_FIELDS if f not in ("elements", "reason")])
    print(evaluate.format_screening(summary))
    print(f"per-structure flags: {path}")


# ----------------------------------------------------------------------------------------------
# download (the paper's 52,028 Materials Project crystals), show (Fig. S1), bench, roundtrip
# ----------------------------------------------------------------------------------------------

def cmd_download(args):
    from pymatgen.core import SETTINGS
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
        rows = data.mp_documents_to_rows(data.query_materials_project(key))
    except Exception as e:  # bad key, no network, API error: one line, no traceback
        raise UserError(f"the Materials Project query failed: {str(e).splitlines()[0][:300]}")
    os.makedirs(args.out, exist_ok=True)
    for split, path in paths.items():
        chosen = [r for r in rows if data.split_of(r["material_id"]) == split]
        data.write_csv(path, chosen)
        print(f"{path}: {len(chosen)} crystals")


def cmd_show(args):
    """Fig. S1: the three channels of one crystal's cloud."""
    out = args.out or os.path.splitext(os.path.basename(args.structure))[0] + "_cloud.png"
    if os.path.exists(out):
        raise UserError(f"{out} exists; name another with --out")
    structure = load_or_fail(args.structure)[0].structure
    length_range = load_checkpoint(args.checkpoint)[1]["length_range"] if args.checkpoint else data.DEFAULT_LENGTH_RANGE
    try:
        cloud, elements = data.encode(structure, length_range=length_range)
    except ValueError as e:
        raise UserError(str(e))
    evaluate.plot_cloud(cloud, elements, structure.composition.reduced_formula, out)
    print(f"wrote {out}")


def cmd_bench(args):
    """Milliseconds per training step and per guided sampling step (both passes, one batch)."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model, ddpm, B = unet.UNet().to(device), diffusion.Diffusion(), args.batch_size
    x = torch.randn(B, 3, 128, 3, device=device)
    condition = (torch.randint(1, 84, (B, 3), device=device), torch.zeros(B, dtype=torch.long, device=device),
                 torch.zeros(B, dtype=torch.long, device=device))
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)

    def train_step():
        optimizer.zero_grad()
        ddpm.loss(model, x, *condition).backward()
        optimizer.step()

    def milliseconds(fn):
        fn()                                                             # warm-up
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        return 1000 * (time.perf_counter() - start) / args.repeats

    train_ms = milliseconds(train_step)
    with torch.no_grad():
        guided_ms = milliseconds(lambda: ddpm.predict_noise(model.eval(), x, 500, condition, guidance=2.0))
    print(f"device {device} ({torch.get_num_threads()} threads), batch {B}")
    print(f"parameters                           {unet.count_parameters(model) / 1e6:8.2f} M   (original PCCD U-Net: 163.7 M)")
    print(f"training step                        {train_ms:8.1f} ms")
    print(f"guided sampling step (2 passes)      {guided_ms:8.1f} ms   (original: ~2500 ms on a 2-core CPU)")
    print(f"one structure, 1000 DDPM steps       {guided_ms * 1000 / B / 1000:8.2f} s    (original: ~78 s)")
    print(f"one structure, 100 DDIM steps        {guided_ms * 100 / B / 1000:8.3f} s")


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
# The command line
# ----------------------------------------------------------------------------------------------

def add_run_arguments(p, seed=0):
    """--device, --threads and --seed, for every command that runs the network."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core; on a "
                   "2-core machine that is busy with something else, 1 is faster)")
    p.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})" if seed is not None
                   else "random seed (default: the preset's, 0)")


def add_sampling_arguments(p, batch_size=256):
    p.add_argument("--checkpoint", default=None, help=f"default: {DEFAULT_RUN}/{CHECKPOINT} if you "
                   f"trained one, else the shipped {os.path.relpath(SHIPPED_CHECKPOINT, HERE)}")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: ancestral sampling over every step (Eq. 6, the paper's); ddim: "
                   "deterministic, --steps steps (default %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps (default 100)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale w: eps = "
                   "eps_uncond + w (eps_cond - eps_uncond); 1 = conditional model only, 0 = "
                   "unconditional only, each one network pass (default: the checkpoint's, 3)")
    p.add_argument("--condition-above", type=int, metavar="STEP",
                   help="use the condition (with guidance w) only at steps >= STEP; below it the "
                   "network denoises without it, in one pass (default: the checkpoint's, 250)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="clouds denoised at once")
    add_run_arguments(p)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pccd.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("train", help="train the diffusion model (Table S1; ~9 min on a 2-core CPU)",
                       description="Train PCCD's U-Net (L1 loss, Eq. S4) to predict v or the noise "
                       "of the encoded crystals. Writes OUT/checkpoint.pt (atomically, every "
                       f"{SAVE_EVERY} steps and at the end) and OUT/loss.png (Fig. S4). Settings "
                       "not given come from the preset, or, with --resume, from the run itself.")
    p.add_argument("--data", help="training crystals: CDVAE CSV, folder or file (default: the "
                   "bundled MP-20 train split; the val split stays unseen)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="quick (default): 6000 steps, batch 32, "
                   "constant lr 2e-3 (~9 min on a 2-core CPU). hour: 8600 steps, batch 128, "
                   "cosine-decayed lr 2e-3 (~45 min; the shipped checkpoint). Both predict v and use "
                   "the condition only at steps >= 250.")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--batch-size", type=int, help="crystals per step (Table S1: 128)")
    p.add_argument("--lr", type=float, help="Adam learning rate (Table S1: 1e-4, which learns much "
                   "slower here: see EXPERIMENTS.md)")
    p.add_argument("--schedule", choices=["constant", "cosine"], help="learning rate over the run: "
                   "constant, or cosine-decayed to 0 at --steps")
    p.add_argument("--prediction", choices=["eps", "v"], help="what the network predicts: eps, the "
                   "noise (the paper's), or v = sqrt(abar) eps - sqrt(1 - abar) x0 (presets: v)")
    p.add_argument("--condition-above", type=int, metavar="STEP", help="use the condition only at "
                   "steps >= STEP: below it, it is always dropped, and sampling does the same "
                   "(presets: 250; 0 = every step, the paper's)")
    p.add_argument("--property-drop", type=float, help="probability of replacing the band-gap class, "
                   "and separately the magnetic ordering, by 'unknown', so that 'unknown' means 'any' "
                   "when sampling (presets: 0.3)")
    p.add_argument("--translate", action="store_true", default=None, help="augment every batch by "
                   "random periodic translations of each crystal (presets: off)")
    p.add_argument("--widths", type=int, nargs=3, metavar="W", help="U-Net channels at 128, 64 "
                   f"and 32 points (presets: {' '.join(map(str, unet.UNetConfig.widths))})")
    p.add_argument("--out", default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt up to --steps")
    add_run_arguments(p, seed=None)
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
    p.add_argument("--pool", choices=sorted(data.POOLS) + ["train"], help="train: the element sets of "
                   "randomly drawn training crystals. all: every element but noble gases and "
                   "radioactive ones; rare-earth-oxides: O plus 1-2 rare-earth, alkaline-earth or "
                   "transition metals; common: " + " ".join(data.POOLS["common"]))
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

    p = sub.add_parser("evaluate", help="screen any folder of CIF/POSCAR files (Table 2)",
                       description="Screen crystals from any generator: structural and compositional "
                       "validity, uniqueness, and novelty against --reference.")
    p.add_argument("folder", help="folder of CIF/POSCAR files (or one file, or a CDVAE CSV)")
    p.add_argument("--reference", default=BUNDLED_TRAIN, help="training structures (default: %(default)s)")
    p.add_argument("--csv", default=None, help="where to write the flags (default FOLDER/screening.csv)")
    p.set_defaults(run=cmd_evaluate)

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

    p = sub.add_parser("bench", help="parameter count and milliseconds per training/sampling step")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    add_run_arguments(p)
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
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
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
