"""Train an MNIST classifier or a small transformer language model with Adagrad in MLX.

    python train.py --optimizer adagrad                      # MLP on MNIST
    python train.py --model cnn                              # small CNN on MNIST
    python train.py --dataset fashion-mnist
    python train.py --task lm --dataset tinyshakespeare      # transformer LM (also ptb, wikitext-2, PATH)
    python train.py --checkpoint-dir ckpt --steps 500 && python train.py --checkpoint-dir ckpt --resume
    python train.py --reproduce curves/mnist_mlp_adagrad.jsonl
    mlx.launch -n 2 --backend ring -- python train.py        # data-parallel on 2 processes

The step is compiled once over the full state (model, optimizer, RNG) and runs on MLX's default
device (--device). On a Linux CPU, training/cpu_tuning.py adds a fast BLAS and kernels built for
this CPU (--cpu-tuning off: MLX as it comes). Data come from --data-dir (default $MLX_ADAGRAD_DATA,
else ~/.cache/mlx-adagrad). Recipes, options and results: README.md and docs/.
"""

import contextlib
import dataclasses
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from data import DataError
from models import ops as model_ops
from recipes import lm, mnist
from training import checkpoint, cpu_tuning, options, paths, reproduce, stops
from training.checkpoint import CheckpointError, RunState
from training.options import DIVERGED, OptionError
from training.paths import PathError
from training.reproduce import RecordError
from training.runlog import JsonlLog, LogError, say
from training.step import build_optimizer, shard, training_step
from training.stops import Interrupts, OutsideError, Stopped, resume_command

RECIPES = {"mnist": mnist.MNIST, "lm": lm.LanguageModel}


class Diverged(Exception):
    """The loss stopped being finite, or grew past DIVERGED times its first value."""


# What a user can fix: one line and exit 2, from main().
USER_ERRORS = (OptionError, DataError, CheckpointError, LogError, RecordError, PathError, OutsideError, Diverged)


def main(argv=None):
    typed = cpu_tuning.typed_command() if argv is None else [sys.executable, "train.py", *argv]
    command = shlex.join(["python", *(sys.argv if argv is None else ["train.py", *argv])])  # as the log records it
    config = None
    try:
        with Interrupts() as interrupts:
            stops.guard_streams(interrupts.lost_output)
            try:
                config = options.parse(argv, __doc__)
                paths.check(config)
                use_device(config.device)
                tuning = cpu_tuning.enable(config.cpu_tuning == "on", config.device, restart=argv is None)
                stops.remove_damaged_kernels()
                if config.reproduce:
                    code = rerun(config, tuning, interrupts)
                    sys.stdout.flush()
                    sys.exit(code)
                trained = train(config, command, tuning, interrupts, resume_command(typed))
                sys.stdout.flush()  # a reader that left (python train.py | head) shows here, not at exit
                return trained
            except (Stopped, *USER_ERRORS):
                raise
            except Exception as e:
                last = checkpoint.last_good(config and config.checkpoint_dir)
                if last:
                    last += f": continue with {resume_command(typed)}"
                if interrupts.signal is not None:  # what the stop cut short (a kernel build it killed, say)
                    raise interrupts.stop_here(f"while MLX was working, which it cut short{last}") from None
                reason = stops.explain(e)
                if reason is None:
                    raise
                raise OutsideError(reason + last) from None
    except USER_ERRORS as e:
        rank = mx.distributed.init().rank() if mx.distributed.is_available() else 0
        print(f"train.py: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(e.code)


def use_device(device):
    """Make `device` ('cpu' or 'gpu') MLX's default for this process."""
    if device == "gpu" and not mx.is_available(mx.gpu):
        raise OptionError(
            "--device gpu: this MLX has no GPU (mlx[cpu] is CPU-only; on Linux with an NVIDIA GPU install "
            "mlx[cuda12] or mlx[cuda13], on a Mac plain mlx), or use --device cpu"
        )
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)


def rerun(config, tuning, interrupts) -> int:
    """--reproduce LOG: rerun the first --reproduce-steps steps of the run LOG records and compare
    what the two logged (training/reproduce.py); 0 if they match, else 1."""
    with tempfile.TemporaryDirectory() as folder:
        rerun_log = Path(folder) / "rerun.jsonl"
        rerun_config, header, recorded = reproduce.prepare(config, rerun_log)
        train(rerun_config, f"python train.py --reproduce {config.reproduce}", tuning, interrupts, resume="")
        if mx.distributed.init().rank() > 0:  # rank 0 wrote the log and compares
            return 0
        return reproduce.judge(header, recorded, rerun_log, config.reproduce_steps)


def train(config, command, tuning, interrupts, resume):
    """Train as `config` says; return the model and optimizer. Under mlx.launch, data-parallel.

    The outputs come first: a run that cannot save what it does, or would overwrite another's, never starts."""
    group = mx.distributed.init()  # a group of one unless started by mlx.launch
    rank, world = group.rank(), group.size()
    if config.batch_size < world * config.streams:
        raise OptionError(
            f"--batch-size {config.batch_size} is smaller than the {world} process(es) x {config.streams} "
            "stream(s): each needs a share of every batch"
        )
    with contextlib.ExitStack() as outputs:  # closed on every exit: the folder is free again, the log closed
        if config.checkpoint_dir and rank == 0:  # the others only read it, to resume
            outputs.enter_context(
                checkpoint.claim(config.checkpoint_dir, config.resume, config.overwrite, config.log_file)
            )
        log = outputs.enter_context(
            JsonlLog(config.log_file if rank == 0 else None, fresh=not config.resume, overwrite=config.overwrite)
        )
        if config.checkpoint_dir and rank == 0 and config.overwrite:  # both outputs claimed: only now
            checkpoint.retire(config.checkpoint_dir)
        return run(config, command, resume, tuning, group, log, interrupts)


@dataclass(frozen=True)
class Run:
    """What a run trains with, fixed once it starts; where it stands is its RunState."""

    config: object
    command: str
    resume: str  # the command line that continues this run
    recipe: object
    model: object
    optimizer: object
    step: object  # the (compiled) training step
    arrays: list  # the state the step reads and writes
    log: JsonlLog
    group: object
    interrupts: Interrupts
    total_steps: int
    started: float  # perf_counter() at elapsed time 0, across resumes

    def elapsed(self):
        return time.perf_counter() - self.started


def run(config, command, resume, tuning, group, log, interrupts):
    """Build the recipe, optimizer and step, start or resume, train, report."""
    rank, world = group.rank(), group.size()
    cpu_tuning.set_blas_threads(config.blas_threads)
    ops = model_ops.for_device(config.device, config.stock_ops)
    blas_threads = f", {threads(cpu_tuning.blas_threads())} of BLAS" if cpu_tuning.blas_threads() > 1 else ""
    processes = f", data-parallel on {world} processes" if world > 1 else ""
    say(f"device: {config.device} ({ops.name}), {tuning['short']}{blas_threads}{processes}")
    if tuning["hint"]:
        say(f"note: {tuning['hint']}")
    mx.random.seed(config.seed)
    recipe = RECIPES[config.task](config, ops)
    recipe.check_memory(config.batch_size)
    model, schedule_steps = recipe.model, config.epochs * recipe.batches.per_epoch
    if config.warmup >= schedule_steps:
        raise OptionError(
            f"--warmup {config.warmup} is not shorter than the run's {schedule_steps} steps: give a smaller --warmup "
            f"(say {schedule_steps // 10}) or more --epochs"
        )
    optimizer = build_optimizer(config, model, schedule_steps)
    say(
        f"{config.optimizer}: optimizer state {sum(v.nbytes for _, v in tree_flatten(optimizer.state)) / 2**20:.2f} "
        f"MiB for {sum(v.size for _, v in tree_flatten(model.parameters())):,} parameters"
    )
    header = {**run_header(config, command, world, tuning, ops), "content": recipe.content}
    if rank > 0:  # same initial weights on every process, but its own dropout and augmentation draws
        mx.random.seed(config.seed + rank)
    state = start_or_resume(config, model, optimizer, header, log, rank)
    total_steps = min(config.steps or math.inf, schedule_steps)
    if state.step >= total_steps and state.pending_eval is None:
        say(f"already finished at step {state.step}; nothing to do")
        return model, optimizer
    # The compiled step captures these objects: build it only after init and any resume.
    arrays = [model.state, optimizer.state, mx.random.state]
    step = training_step(model, optimizer, recipe.loss, config.streams, world, config.sparse_embeddings)
    if not config.no_compile:
        step = mx.compile(step, inputs=arrays, outputs=arrays)
    with interrupts.deferred(world):
        started = time.perf_counter() - state.elapsed_s
        fixed = Run(config, command, resume, recipe, model, optimizer, step, arrays, log, group, interrupts,
                    total_steps, started)  # fmt: skip
        model.train()
        try:
            train_loop(fixed, state)
        except LogError as e:  # the log is lost, not the training
            raise LogError(f"{e}{keep(fixed, state)}") from None
    report(fixed)
    return model, optimizer


def start_or_resume(config, model, optimizer, header, log, rank):
    """The RunState to train from: a new run's, or the checkpoint's (its arrays loaded into `model`
    and `optimizer`); the log started, or continued if it is this run's."""
    if not config.resume:
        state = RunState(run_id=uuid.uuid4().hex[:12])
        log.start({**header, "run_id": state.run_id})
        return state
    identity = {k: v for k, v in header["config"].items() if k in options.IDENTITY or k == "world_size"}
    state = checkpoint.load(config.checkpoint_dir, model, optimizer, identity, header["content"], rank)
    log.resume(state.log_lines, {**header, "run_id": state.run_id})
    say(f"resumed from {config.checkpoint_dir} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})")
    return state


def train_loop(run, state):
    """Train until --steps or --epochs, evaluating every --eval-every epochs; a stop signal saves and ends it."""
    config, batches = run.config, run.recipe.batches
    if state.pending_eval is not None:  # the run was stopped before it evaluated
        evaluate(run, state, state.pending_eval)
        state.pending_eval = None
    while state.step < run.total_steps:
        seen, tic = 0, time.perf_counter()
        with progress_bar(run, state) as bar:
            for batch in bar:
                take_step(run, state, batch)
                seen += run.recipe.count(batch)
                if state.step % config.log_every == 0:
                    log_loss(run, state, seen / (time.perf_counter() - tic), bar)
                ends = state.batch == batches.per_epoch or state.step == run.total_steps
                pending_eval = state.epoch + 1 if ends and evaluates(run, state) else None
                if config.checkpoint_dir and state.step % config.checkpoint_every == 0:
                    save(run, state, pending_eval)
                if run.interrupts.stopped():
                    stop(run, state, pending_eval)
                if ends:
                    break
        trained_epoch, rate = state.epoch + 1, f", {seen / (time.perf_counter() - tic):.0f} {run.recipe.unit}/s"
        evaluating = evaluates(run, state)
        state.roll_over(batches.per_epoch)
        if evaluating:
            evaluate(run, state, trained_epoch, rate)
        else:
            say(epoch_line(state, trained_epoch, rate))
        if run.interrupts.stopped():
            stop(run, state)
    if config.checkpoint_dir:
        save(run, state)


def evaluates(run, state) -> bool:
    """Whether the epoch being trained ends in an evaluation: every --eval-every epochs, and the last."""
    return (state.epoch + 1) % run.config.eval_every == 0 or state.step == run.total_steps


def progress_bar(run, state):
    """The epoch's batches behind a progress bar, on rank 0 and only on a terminal (a log file gets the
    epoch lines alone); its total is where this epoch ends, --steps included."""
    per_epoch = run.recipe.batches.per_epoch
    return tqdm(
        run.recipe.batches.epoch(state.epoch, state.batch),
        total=min(per_epoch, state.batch + run.total_steps - state.step),
        initial=state.batch,
        desc=f"epoch {state.epoch + 1}/{run.config.epochs}",
        leave=False,
        mininterval=0.5,
        disable=run.group.rank() > 0 or not sys.stderr.isatty(),
    )


def take_step(run, state, batch):
    """One optimizer step on `batch`; Diverged when its loss is not finite or far above the first."""
    loss = run.step(*shard(batch, run.group.rank(), run.group.size()))
    mx.eval(run.arrays, loss)
    loss = loss.item()
    state.step, state.batch, state.last_loss = state.step + 1, state.batch + 1, loss
    state.first_loss = loss if state.first_loss is None else state.first_loss
    if not math.isfinite(loss) or abs(loss) > DIVERGED * abs(state.first_loss):
        raise Diverged(
            f"loss is {loss:.4g} at step {state.step} (first step: {state.first_loss:.4g}): training diverged, try "
            f"a lower --lr{checkpoint.last_good(run.config.checkpoint_dir)}"
        )
    state.window.append(loss)


def log_loss(run, state, rate, bar):
    """Log the mean loss of the steps since the last log line, and the speed."""
    unit = f"{run.recipe.unit}_per_s"
    lr = run.optimizer.learning_rate.item()
    run.log.write({"step": state.step, "epoch": state.epoch + 1, "loss": sum(state.window) / len(state.window),
                   "lr": lr, unit: rate})  # fmt: skip
    bar.set_postfix(loss=f"{state.window[-1]:.3f}", **{unit: f"{rate:.0f}"}, refresh=False)
    state.window = []


def evaluate(run, state, trained_epoch, rate=""):
    """Evaluate and log on rank 0; the others go on and wait for it at the next gradient average."""
    if run.group.rank() > 0:
        return
    run.model.eval()
    metrics, summary = run.recipe.evaluate(run.model, final=state.step == run.total_steps)
    run.model.train()
    run.log.write({"step": state.step, "epoch": trained_epoch, **metrics, "elapsed_s": run.elapsed()})
    print(epoch_line(state, trained_epoch, f", {summary}{rate}"))


def epoch_line(state, trained_epoch, rest):
    loss = "" if state.last_loss is None else f", train loss {state.last_loss:.4f}"
    return f"epoch {trained_epoch}: step {state.step}{loss}{rest}"


def save(run, state, pending_eval=None):
    """Save the run where it stands (an epoch trained but not evaluated: `pending_eval`)."""
    saved = dataclasses.replace(state, pending_eval=pending_eval, log_lines=run.log.lines, elapsed_s=run.elapsed())
    run_state = {**saved.to_json(run.recipe.batches.per_epoch), "config": config_record(run.config, run.group.size())}
    run_state["content"] = run.recipe.content
    checkpoint.save(run.config.checkpoint_dir, run.model, run.optimizer, run_state, run.group)


def stop(run, state, pending_eval=None):
    """After a stop (a signal, a lost standard stream): save where the run stands and raise Stopped."""
    raise run.interrupts.stop_here(f"at step {state.step}{keep(run, state, pending_eval)}")


def keep(run, state, pending_eval=None) -> str:
    """Save the run where it stands, if it has a --checkpoint-dir; say what was kept and how to continue."""
    if not run.config.checkpoint_dir:
        return "; no --checkpoint-dir, so nothing to resume"
    try:
        save(run, state, pending_eval)
    except CheckpointError as e:
        return f"; {e}"
    return f"; saved step {state.step} in {run.config.checkpoint_dir}: continue with {run.resume}"


def report(run):
    """What a finished run prints besides its evaluations: L1's zeros, sampled text."""
    if run.config.l1:
        weights = [v for _, v in tree_flatten(run.model.trainable_parameters())]
        zeros, size = sum((v == 0).sum().item() for v in weights), sum(v.size for v in weights)
        say(f"L1: {zeros:,} of {size:,} weights are exactly zero ({100 * zeros / size:.1f}%)")
    if run.config.task == "lm" and run.config.sample:
        say(run.recipe.sample(run.model, run.config.sample, run.config.temperature))


def threads(count):
    return f"{count} thread" + ("s" if count != 1 else "")


def config_record(config, world):
    """Every option's value (paths as text) and the number of processes: what a log and a checkpoint record."""
    return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()}, "world_size": world}


def run_header(config, command, world, tuning, ops):
    """The log's first line: the command, every option's value, and the machine it runs on."""
    return {
        "command": command,
        "config": config_record(config, world),
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_tuning.cpu_model(),
        "cores": os.cpu_count(),
        "device": config.device,
        "cpu_ops": ops is model_ops.CPU,
        "blas": f"{tuning['blas']}, {threads(cpu_tuning.blas_threads())}",
        "kernels": tuning["kernels"],
    }


if __name__ == "__main__":
    main()
