"""The two-phase VAE-GAN trainer.

Each step: for `gradient_accumulate_every` micro-batches, the autoencoder's loss (reconstruction
+ KL, plus the adaptive GAN term in phase 2) and, in phase 2 only, the discriminator's loss are
back-propagated; then both optimizers step (the critic only in phase 2), the lr schedulers
advance and the EMA updates. Every `save_and_sample_every` steps the EMA weights are validated,
a sample grid is drawn and `model-{milestone}.pt` is written atomically. Under torchrun the
autoencoder and the critic are DDP-wrapped and rank 0 alone writes.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from model.autoencoder import AutoencoderKL
from model.checkpoint import (EMA_PREFIX, CheckpointError, latest_checkpoint, load_into,
                              read_checkpoint, resolve_checkpoint, save_checkpoint)
from model.config import ConfigError
from model.io import write_png
from model.loading import choose_weights, read_file
from model.losses import LPIPSWithDiscriminator
from model.lpips import missing_weights
from model.run_config import RunConfig, TrainerConfig, dump_config
from radiomaps import DataError, build_dataset, build_loader, validation_subset
from runtime import distributed
from runtime.progress import log_line
from train.ema import EMA
from train.evaluate import means_from_sums, metric_sums, sample_grid
from train.logging import METRICS_FILE, RunLogger
from train.memory import choose_checkpointing, step_bytes
from train.schedule import lr_multiplier
from train.signals import StopRequest
from train.stream import BatchStream

LOSS_PREFIX = "loss."
CRITIC_PREFIX = LOSS_PREFIX + "discriminator."
# What makes a folder hold a run: a fresh run moves such a folder aside first.
RUN_FILES = ("model-*.pt", "sample-*.png", METRICS_FILE, "events.out.tfevents.*")


# Under fp16 an overflow of the adaptive weight's scaled gradients makes these non-finite
OVERFLOW_TERMS = ("train/d_weight", "train/total_loss")


class TrainingDiverged(RuntimeError):
    """A loss term became NaN/Inf; the message names the step, the terms and the last checkpoint."""


class MissingInputs(DataError):
    """What a run needs and cannot find: the data, LPIPS's weight files, model.ckpt_path."""

    def __init__(self, problems: list[str]):
        numbered = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        super().__init__(problems[0] if len(problems) == 1
                         else f"{len(problems)} inputs are missing: {numbered}")


def gather_inputs(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """The train and val datasets, built before anything else is; every input that is missing
    (the data first, then LPIPS's weight files and model.ckpt_path) in one MissingInputs."""
    problems, datasets = [], []
    try:
        datasets = [build_dataset(cfg.data, split) for split in ("train", "val")]
    except DataError as err:
        problems.append(str(err))
    loss = cfg.model.lossconfig
    if loss.perceptual_weight > 0:
        problems += missing_weights(loss.allow_random_lpips)
    if cfg.model.ckpt_path:
        try:
            resolve_checkpoint(cfg.model.ckpt_path)
        except CheckpointError as err:
            problems.append(f"model.ckpt_path: {err}")
    if problems:
        raise MissingInputs(problems)
    return datasets[0], datasets[1]


def milestone_path(run_dir: Path, milestone: int) -> Path:
    return run_dir / f"model-{milestone}.pt"


def checkpoint_to_resume(cfg: RunConfig, latest: bool = False) -> Path | None:
    """`trainer.resume_milestone`'s file (which must exist), else with `latest` the newest
    `model-N.pt` of the results folder, else None (a fresh start)."""
    run_dir = Path(cfg.trainer.results_folder)
    milestone = cfg.trainer.resume_milestone
    if milestone is not None:
        path = milestone_path(run_dir, milestone)
        if not path.is_file():
            raise CheckpointError(f"{path}: trainer.resume_milestone is {milestone} but this "
                                  "checkpoint does not exist")
        return path
    return latest_checkpoint(run_dir) if latest else None


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds checkpoints, samples, metrics or TensorBoard events of a run."""
    return any(next(run_dir.glob(pattern), None) is not None for pattern in RUN_FILES)


def move_aside(run_dir: Path) -> Path | None:
    """Rename a folder that holds a run to `<folder>.prev-<UTC time>` (a new name, never an
    existing one) and recreate it empty; return where the old run went, or None."""
    if not holds_a_run(run_dir):
        return None
    folder = run_dir.resolve()
    if Path.cwd().is_relative_to(folder):
        raise ConfigError(f"trainer.results_folder {run_dir} holds an earlier run and contains "
                          "the current directory, so it cannot be moved aside: choose another "
                          "folder, or continue that run with --resume")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = folder.with_name(f"{folder.name}.prev-{stamp}"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.prev-{stamp}-{n}"), n + 1
    folder.rename(target)
    folder.mkdir()
    return target


def autocast_dtype(tc: TrainerConfig) -> torch.dtype | None:
    """float16 for `fp16` whatever `amp` says (upstream's accelerate mixed_precision='fp16'),
    bfloat16 for `amp` alone, None (fp32) for neither."""
    if tc.fp16:
        return torch.float16
    return torch.bfloat16 if tc.amp else None


def check_precision(tc: TrainerConfig, device: torch.device) -> None:
    """Refuse float16 mixed precision off CUDA instead of silently training in another one."""
    if tc.fp16 and device.type != "cuda":
        raise ConfigError("trainer.fp16: true means float16 mixed precision (upstream's "
                          "accelerate mixed_precision='fp16'), which needs a CUDA device; on "
                          f"{device.type} set trainer.fp16: false (and trainer.amp: true for "
                          "bfloat16 autocast)")


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_upstream_checkpoint(ckpt: dict) -> bool:
    """An upstream RadioDiff model-N.pt: this trainer's layout without `config` (and `rng`)."""
    return "config" not in ckpt


def optimizer_fits(opt: torch.optim.Optimizer, state: object) -> bool:
    """Whether a saved optimizer state has `opt`'s param groups: sizes and tensor shapes."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        return False
    saved = state["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in opt.param_groups]:
        return False
    params = dict(zip([i for g in saved for i in g["params"]],
                      [p for g in opt.param_groups for p in g["params"]]))
    return all(i in params and t.shape == params[i].shape
               for i, entry in state.get("state", {}).items() for t in entry.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


class Trained(nn.Module):
    """What the autoencoder's DDP wrapper holds: the network, and `logvar` when it is learned
    (used by the loss outside forward, it still gets its gradient all-reduced with the rest).
    Checkpoints keep saving `model` and `loss.logvar` under their own keys."""

    def __init__(self, model: AutoencoderKL, logvar: nn.Parameter | None):
        super().__init__()
        self.model = model
        if logvar is not None:
            self.logvar = logvar

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class Trainer:
    """Builds the model, loss, optimizers and data from a RunConfig and trains it."""

    def __init__(self, cfg: RunConfig, train_set: Dataset | None = None,
                 val_set: Dataset | None = None):
        self.cfg = cfg
        self.env = distributed.setup(cfg.trainer.device)
        self.start_notes: list[str | None] = []  # said once when training starts (rank 0)
        self.device = self.env.device
        check_precision(cfg.trainer, self.device)
        self.run_dir = Path(cfg.trainer.results_folder)
        if self.device.type == "cuda":  # fixed input sizes: let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        self._build_model()
        self._build_optimizers()
        self._build_loaders(train_set, val_set)
        self.step = 0
        self.fresh = True  # no checkpoint loaded: train() moves an earlier run aside
        self._saved_rng: list[dict] | None = None
        self._critic_synced = False

    def _build_model(self) -> None:
        """Autoencoder, loss (LPIPS weights are checked here, before step 0), EMA, noise RNG."""
        tc = self.cfg.trainer
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = AutoencoderKL.from_config(self.cfg.model).to(self.device)
        self.model.enable_gradient_checkpointing(self._checkpointing())
        self.loss = LPIPSWithDiscriminator(self.cfg.model.lossconfig).to(self.device)
        if self.cfg.model.ckpt_path:
            self._init_from(self.cfg.model.ckpt_path)
        self.ema = EMA(self.model, tc.ema_decay, tc.ema_update_every, tc.ema_update_after_step,
                       tc.ema_power, tc.ema_inv_gamma)
        torch.manual_seed(tc.seed + self.env.rank)
        self.noise = torch.Generator(self.device).manual_seed(tc.seed + self.env.rank)
        # a learned logvar is trained with the autoencoder: inside its DDP wrapper, so that
        # its gradient is all-reduced with the network's and the ranks keep one value
        learned = self.cfg.model.lossconfig.learn_logvar
        self.ae = self._wrap(Trained(self.model, self.loss.logvar if learned else None))
        self.critic = self._wrap(self.loss.discriminator)

    def _checkpointing(self) -> bool:
        """trainer.gradient_checkpointing, with 'auto' resolved against the free GPU memory."""
        tc = self.cfg.trainer
        params = sum(p.numel() for p in self.model.parameters())
        needed = step_bytes(self.cfg.model.ddconfig, self.cfg.train_size, self.cfg.batch_size,
                            autocast_dtype(tc) is not None, params)
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        on, why = choose_checkpointing(tc.gradient_checkpointing, self.device.type, needed, free)
        self.start_notes.append(why)
        return on

    def _build_optimizers(self) -> None:
        tc = self.cfg.trainer
        ae_params = list(self.model.parameters())
        if self.cfg.model.lossconfig.learn_logvar:
            ae_params.append(self.loss.logvar)
        self.opt_ae = torch.optim.AdamW(ae_params, lr=tc.lr)
        self.opt_disc = torch.optim.AdamW(self.loss.discriminator.parameters(), lr=tc.lr)
        self._schedules_at(0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.fp16)

    def _schedules_at(self, step: int) -> None:
        """Both lr schedules, from this config's `lr`, positioned at `step`."""
        tc = self.cfg.trainer
        for opt in (self.opt_ae, self.opt_disc):
            for group in opt.param_groups:
                group["initial_lr"] = tc.lr
        self.sched_ae = torch.optim.lr_scheduler.LambdaLR(self.opt_ae, lr_multiplier(tc),
                                                          last_epoch=step - 1)
        self.sched_disc = torch.optim.lr_scheduler.LambdaLR(self.opt_disc, lr_multiplier(tc),
                                                            last_epoch=step - 1)

    def _build_loaders(self, train_set: Dataset | None, val_set: Dataset | None) -> None:
        data, batch = self.cfg.data, self.cfg.batch_size
        train_set = train_set if train_set is not None else build_dataset(data, "train")
        val_set = val_set if val_set is not None else build_dataset(data, "val")
        self.train_loader = build_loader(train_set, batch, shuffle=True, seed=data.seed,
                                         num_workers=data.num_workers, drop_last=True)
        self.val_loader = build_loader(validation_subset(val_set, self.cfg.trainer.val_size,
                                                         data.seed),
                                       batch, shuffle=False, seed=data.seed,
                                       num_workers=data.num_workers, drop_last=False)

    # ----- set-up -------------------------------------------------------------------------
    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.env.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def _init_from(self, path: str) -> None:
        """Start from the network weights of `model.ckpt_path` (model/loading.py's rule: EMA
        if present), and from its critic and logvar (raw `model` weights) when it holds them."""
        chosen = choose_weights(read_file(path), self.cfg.model)
        ignore = tuple(self.cfg.model.ignore_keys)  # upstream's: those keep their fresh init
        state = {k: v for k, v in chosen.state.items() if not k.startswith(ignore)}
        if ignore:
            state = {**self.model.state_dict(), **state}
        load_into(self.model, state, chosen.path)
        raw = chosen.contents.get("model")
        raw = raw if isinstance(raw, dict) else {}
        self._load_critic({k: v for k, v in raw.items() if not k.startswith(ignore)}, chosen.path)

    def _load_critic(self, raw: dict, source: str | Path) -> list[str]:
        """Load `loss.discriminator.*` and `loss.logvar` from a checkpoint's raw `model`
        weights when present (LPIPS stays as built); return the names of what was loaded."""
        loaded = []
        critic = strip_prefix(raw, CRITIC_PREFIX)
        if critic:
            load_into(self.loss.discriminator, critic, source)
            loaded.append("critic")
        logvar = raw.get(LOSS_PREFIX + "logvar")
        if isinstance(logvar, torch.Tensor) and logvar.shape == self.loss.logvar.shape:
            with torch.no_grad():
                self.loss.logvar.copy_(logvar)
            loaded.append("logvar")
        return loaded

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = autocast_dtype(self.cfg.trainer)
        return torch.autocast(self.device.type, dtype=dtype or torch.bfloat16,
                              enabled=dtype is not None)

    def say(self, message: str) -> None:
        """Print one line, on rank 0 only."""
        if self.env.is_main:
            print(message, flush=True)

    @property
    def finished(self) -> bool:
        """Whether `train_num_steps` is reached: a resumed finished run has nothing to do."""
        return self.step >= self.cfg.trainer.train_num_steps

    # ----- checkpoints --------------------------------------------------------------------
    def state_dict(self, rng: list[dict]) -> dict:
        """Everything a bit-for-bit resume needs, in upstream's key layout plus `config`; the
        frozen LPIPS weights (`loss.perceptual_loss.*`) are rebuilt from their files instead."""
        model = self.model.state_dict()
        model.update({LOSS_PREFIX + k: v for k, v in self.loss.trained_state_dict().items()})
        return {"step": self.step, "model": model, "ema": self.ema.state_dict(),
                "opt_ae": self.opt_ae.state_dict(), "lr_scheduler_ae": self.sched_ae.state_dict(),
                "opt_disc": self.opt_disc.state_dict(),
                "lr_scheduler_disc": self.sched_disc.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "config": dump_config(self.cfg)}

    def resume(self, path: str | Path) -> str | None:
        """Restore a checkpoint written by `save` (RNG states are restored when training
        starts); an upstream RadioDiff file is a warm start: return its note of what it restored."""
        ckpt = read_checkpoint(path, map_location=self.device)
        self.fresh = False
        try:
            if is_upstream_checkpoint(ckpt):
                return self._warm_start(ckpt, path)
            self._restore(ckpt, path)
            return self._apply_config_lr()
        except CheckpointError:
            raise
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot resume from it (a different lossconfig or "
                                  f"not a trainer checkpoint?): {str(err).splitlines()[0]}"
                                  ) from None

    def _apply_config_lr(self) -> str | None:
        """A resumed run follows this config's trainer.lr: when the checkpoint's schedules were
        built from another lr, rebuild them at the same position and say so."""
        saved, lr = self.sched_ae.base_lrs[0], self.cfg.trainer.lr
        if saved == lr:
            return None
        self._schedules_at(self.sched_ae.last_epoch)
        return (f"trainer.lr is {lr:g} in this config and {saved:g} in the checkpoint: the lr "
                f"schedules now follow {lr:g} (lr {self.opt_ae.param_groups[0]['lr']:.4g} at "
                "this step)")

    def _restore(self, ckpt: dict, path: str | Path) -> None:
        """This trainer's full state, bit for bit."""
        load_into(self.model, ckpt["model"], path)
        self.loss.load_trained_state_dict(strip_prefix(ckpt["model"], LOSS_PREFIX))
        self.ema.load_state_dict(ckpt["ema"])
        self.opt_ae.load_state_dict(ckpt["opt_ae"])
        self.opt_disc.load_state_dict(ckpt["opt_disc"])
        self.sched_ae.load_state_dict(ckpt["lr_scheduler_ae"])
        self.sched_disc.load_state_dict(ckpt["lr_scheduler_disc"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self._saved_rng = ckpt.get("rng")

    def _warm_start(self, ckpt: dict, path: str | Path) -> str:
        """An upstream file: weights (model, critic, logvar, EMA without its loss keys), step,
        and the optimizer states whose param groups fit; lr schedules follow this config."""
        raw = ckpt["model"]
        load_into(self.model, raw, path)
        ema_loss = EMA_PREFIX + LOSS_PREFIX
        self.ema.load_state_dict({k: v for k, v in ckpt["ema"].items()
                                  if not k.startswith(ema_loss)})
        restored = ["autoencoder", "EMA", *self._load_critic(raw, path)]
        self.step = int(ckpt["step"])
        for name, opt in (("opt_ae", self.opt_ae), ("opt_disc", self.opt_disc)):
            if optimizer_fits(opt, ckpt.get(name)):
                opt.load_state_dict(ckpt[name])
                restored.append(name)
        self._schedules_at(self.step)
        lost = [n for n in ("critic", "logvar") if n not in restored]
        lost += [f"{n} (param groups differ)" for n in ("opt_ae", "opt_disc") if n not in restored]
        lost += ["lr schedules (this config's, at that step)", "gradient scaler",
                 "RNG states (fresh seeds)"]
        return (f"{path} is an upstream RadioDiff checkpoint, so this is a warm start: restored "
                f"{', '.join(restored)} and step {self.step}; not restored: {', '.join(lost)}")

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state(), "noise": self.noise.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore_rng(self) -> None:
        saved = self._saved_rng
        if not saved:
            return
        if len(saved) != self.env.world_size:
            print(f"note: the checkpoint holds RNG states for {len(saved)} processes, this run "
                  f"has {self.env.world_size}: reseeding (not bit-for-bit)", file=sys.stderr)
            torch.manual_seed(self.cfg.trainer.seed + self.env.rank + self.step)
            self.noise.manual_seed(self.cfg.trainer.seed + self.env.rank + self.step)
            return
        mine = saved[self.env.rank]
        torch.set_rng_state(mine["torch"].cpu())
        self.noise.set_state(mine["noise"].cpu())
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"].cpu(), self.device)

    def _check_replicas(self) -> None:
        """Under DDP every rank must hold the same weights; a bitwise checksum proves it."""
        params = [*self.model.parameters(), *self.loss.discriminator.parameters(),
                  self.loss.logvar]
        total = torch.stack([p.detach().double().sum() for p in params]).sum()
        spread = torch.stack([total, -total])
        distributed.all_reduce(spread, self.env, op="max")
        if spread[0] != -spread[1]:
            raise TrainingDiverged(f"step {self.step}: the DDP processes hold different "
                                   "weights (checksums differ); nothing saved")

    def save(self, milestone: int, logger: RunLogger) -> Path | None:
        """Validate the EMA weights, draw samples, write `model-{milestone}.pt` (rank 0)."""
        if self.env.enabled:
            self._check_replicas()
        sums, first = metric_sums(self.ema.ema_model, self.val_loader, self.device,
                                  autocast=self.autocast())
        val = means_from_sums(distributed.all_reduce(sums, self.env))
        rng = distributed.all_gather_objects(self._rng_state(), self.env)
        path = None
        if self.env.is_main:
            logger.log(self.step, {f"val/{k}": v for k, v in val.items()})
            if first is not None:
                grid = sample_grid(*first, rows=self.cfg.trainer.num_samples)
                write_png(self.run_dir / f"sample-{milestone}.png", grid)
            path = save_checkpoint(milestone_path(self.run_dir, milestone), self.state_dict(rng))
        distributed.barrier(self.env)
        return path

    # ----- one step -----------------------------------------------------------------------
    def _no_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's all-reduce on all but the last micro-batch of an accumulated step."""
        if isinstance(module, DDP) and not sync:
            return module.no_sync()
        return contextlib.nullcontext()

    def _micro_step(self, x: torch.Tensor, adversarial: bool, sync: bool) -> dict:
        accum = self.cfg.trainer.gradient_accumulate_every
        with self._no_sync(self.ae, sync):
            with self.autocast():
                recon, posterior = self.ae(x, generator=self.noise)
                loss, log = self.loss.generator_loss(x, recon, posterior, self.step,
                                                     self.model.get_last_layer(),
                                                     grad_scale=self._grad_scale())
            self.scaler.scale(loss / accum).backward()
        if adversarial:
            if self.env.enabled and not self._critic_synced:
                # ActNorm initialises from the first batch it sees, which differs per rank.
                distributed.broadcast_module(self.loss.discriminator, self.env)
                self._critic_synced = True
            with self._no_sync(self.critic, sync):
                with self.autocast():
                    d_loss, d_log = self.loss.discriminator_loss(x, recon, self.step,
                                                                 discriminator=self.critic)
                self.scaler.scale(d_loss / accum).backward()
            log.update(d_log)
        return log

    def _grad_scale(self) -> torch.Tensor | None:
        """The GradScaler's current scale as a device tensor (no host sync) under fp16, so the
        adaptive weight's gradients are taken scaled, as backward's are; None otherwise."""
        if not self.scaler.is_enabled():
            return None
        return self.scaler.scale(torch.ones((), device=self.device))

    def _check(self, log: dict[str, torch.Tensor], stop: StopRequest) -> tuple[bool, bool]:
        """Raise if any rank saw a non-finite term; return whether any rank was asked to stop,
        and whether (fp16) the adaptive weight's scaled gradients overflowed on any rank, a
        step the GradScaler must skip rather than a divergence. One host sync and one
        all-reduce of three flags per step (the guard that keeps a NaN out of the weights);
        the logged values are reduced only every log_freq steps."""
        finite = {name: torch.isfinite(v) for name, v in log.items()}
        overflow = torch.zeros((), dtype=torch.bool, device=self.device)
        if self.scaler.is_enabled() and "train/d_weight" in log:
            overflow = ~finite["train/d_weight"]
            finite.update({name: finite[name] | overflow for name in OVERFLOW_TERMS})
        bad = ~torch.stack(list(finite.values())).all()
        flags = torch.stack([bad, overflow,
                             torch.tensor(stop.signum is not None, device=self.device)])
        diverged, overflowed, stopping = distributed.all_reduce(flags.float(), self.env,
                                                                op="max").tolist()
        if diverged:
            raise TrainingDiverged(self._divergence(log))
        return bool(stopping), bool(overflowed)

    def _divergence(self, log: dict[str, torch.Tensor]) -> str:
        """The message of a non-finite step: this rank's bad terms and the last checkpoint."""
        bad = [f"{n} = {v.item()}" for n, v in log.items() if not torch.isfinite(v)]
        values = ", ".join(bad) or "on another process"
        last = None if self.fresh else latest_checkpoint(self.run_dir)  # not an earlier run's
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"step {self.step}: non-finite loss ({values}); stopped before the optimizer "
                f"step, nothing saved; {kept}")

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        clip = self.cfg.trainer.grad_clip
        if clip:  # before the step (upstream clips after it, which does nothing)
            self.scaler.unscale_(opt)
            params = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(opt)

    def train_step(self, stream: BatchStream, stop: StopRequest) -> tuple[dict, bool]:
        """One optimizer step over `gradient_accumulate_every` micro-batches."""
        tc = self.cfg.trainer
        adversarial = self.loss.adversarial(self.step)
        self.opt_ae.zero_grad(set_to_none=True)
        self.opt_disc.zero_grad(set_to_none=True)
        logs = []
        for micro in range(tc.gradient_accumulate_every):
            x = next(stream)["image"].to(self.device, non_blocking=True)
            logs.append(self._micro_step(x, adversarial, micro == tc.gradient_accumulate_every - 1))
        log = {k: torch.stack([entry[k].float() for entry in logs]).mean() for k in logs[0]}
        stopping, overflow = self._check(log, stop)
        if overflow:  # as GradScaler does with an overflow: no update, a lower scale
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            self._optimizer_step(self.opt_ae)
            if adversarial:
                self._optimizer_step(self.opt_disc)
        if not overflow and self._scaler_update():  # a skipped step moves neither lr nor EMA
            self._advance_schedules()
            self.ema.update()
        self.step += 1
        return log, stopping

    def _scaler_update(self) -> bool:
        """GradScaler.update(); False when it skipped this step's optimizer updates (inf/NaN
        gradients under fp16: it then lowers the scale). The comparison reads the scale on the
        host, once per step and under fp16 only, where scaler.step has synced already."""
        if not self.scaler.is_enabled():
            return True
        before = self.scaler.get_scale()
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def _advance_schedules(self) -> None:
        self.sched_ae.step()
        with warnings.catch_warnings():
            # In phase 1 the critic's lr follows the global step although it does not step
            # (as upstream); torch warns about exactly that.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched_disc.step()

    # ----- the loop -----------------------------------------------------------------------
    def _log(self, log: dict, logger: RunLogger, bar: tqdm, rate: float) -> None:
        names = list(log)
        values = torch.stack([log[n] for n in names])
        values = (distributed.all_reduce(values, self.env) / self.env.world_size).tolist()
        scalars = dict(zip(names, values))
        scalars["lr"] = self.opt_ae.param_groups[0]["lr"]
        scalars["it_per_s"] = rate
        if self.device.type == "cuda":
            scalars["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        logger.log(self.step - 1, scalars)
        short = {k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items()
                 if k in ("train/rec_loss", "train/kl_loss", "train/g_loss", "train/disc_loss")}
        if not bar.disable:
            bar.set_postfix(short, refresh=False)
        elif self.env.is_main:  # off a terminal: one line per log_freq, in the one log format
            print(log_line(f"train: step {self.step - 1}/{self.cfg.trainer.train_num_steps} "
                           + " ".join(f"{k} {v}" for k, v in short.items())
                           + f" ({rate:.2f} it/s)"), flush=True)

    def _prepare_run_dir(self) -> None:
        """Rank 0 moves an earlier run aside (a fresh run) and writes config.yaml; all wait."""
        if self.env.is_main:
            moved = move_aside(self.run_dir) if self.fresh else None
            if moved is not None:
                self.say(f"note: {self.run_dir} held an earlier run: moved it to {moved}; this "
                         "run starts in an empty folder (--resume continues a run instead)")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(dump_config(self.cfg),
                                                                     sort_keys=False))
        self.fresh = False
        distributed.barrier(self.env)

    def start_lines(self) -> list[str]:
        """What rank 0 says once when training starts: processes, memory choice, traps."""
        tc = self.cfg.trainer
        lines = [distributed.describe(self.env), distributed.single_process_note(),
                 *self.start_notes]
        if tc.gradient_accumulate_every > 1:
            k, batch = tc.gradient_accumulate_every, self.cfg.batch_size
            lines.append(
                f"note: trainer.gradient_accumulate_every: {k} accumulates {k} micro-batches of "
                f"{batch} per optimizer step (effective batch {k * batch * self.env.world_size})"
                f": {k}x the data per step of upstream RadioDiff, whose loop with the same "
                f"setting steps on one batch of {batch}; set trainer.gradient_accumulate_every=1 "
                "to match upstream's data per step")
        return [line for line in lines if line]

    def train(self) -> int | None:
        """Train to `train_num_steps`; return the signal number if stopped by one (after saving).
        A run already at `train_num_steps` returns at once and writes nothing. The results
        folder is touched (an earlier run moved aside, config.yaml written) only once the first
        step has run: a run that cannot start leaves it as it was."""
        tc = self.cfg.trainer
        if self.finished:
            return None
        for line in self.start_lines():
            self.say(line)
        stream = BatchStream(self.train_loader, consumed=self.step * tc.gradient_accumulate_every)
        self._restore_rng()
        logger: RunLogger | None = None
        bar = tqdm(total=tc.train_num_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.env.is_main and sys.stderr.isatty()))
        self.model.train()
        self.loss.train()
        saved_at, window = self.step, (self.step, time.perf_counter())
        try:
            with StopRequest() as stop:
                while self.step < tc.train_num_steps:
                    log, stopping = self.train_step(stream, stop)
                    if logger is None:  # the first step ran: this run is known to start
                        logger = self._open_run_dir()
                    bar.update(1)
                    if (self.step - 1) % tc.log_freq == 0:
                        now = time.perf_counter()
                        self._log(log, logger, bar, (self.step - window[0]) / (now - window[1]))
                        window = (self.step, now)
                    if self.step % tc.save_and_sample_every == 0 or stopping:
                        self.save(math.ceil(self.step / tc.save_and_sample_every), logger)
                        saved_at = self.step
                    if stopping:
                        return stop.signum
                if saved_at != self.step:
                    self.save(math.ceil(self.step / tc.save_and_sample_every), logger)
                return None
        finally:
            bar.close()
            if logger is not None:
                logger.close()

    def _open_run_dir(self) -> RunLogger:
        """The results folder made ready (_prepare_run_dir) and its logger."""
        start = self.step - 1  # the step just taken is logged into the folder
        self._prepare_run_dir()
        return RunLogger(self.run_dir, enabled=self.env.is_main, start_step=start)
