"""The generic train loop over a :class:`trainflow.trainers.family.ModelFamily`.

One code path runs alone and under torchrun (a family's ``__main__`` calls :func:`main`)::

    python -m trainflow.trainers.train --pipeline NAME --config run.json --train.epochs=2
    torchrun --standalone --nproc-per-node 2 -m trainflow.trainers.train --pipeline NAME --config run.json

What the loop does, in order: join the process group (:mod:`trainflow.trainers.distributed`), seed,
load the manifest, build the family's model and wrap it (DDP, or FSDP2 ``fully_shard`` on the
family's ``fsdp_modules()`` then the root), build AdamW/Adam and the LR schedule, resume from
the run directory's last committed checkpoint, then per epoch: micro batches from
``family.train_batches`` with gradient accumulation (bf16 autocast on CUDA), a progress line
every ``log_every_steps`` optimizer steps, checkpoints every ``checkpoint_every_steps``, once
``checkpoint_every_minutes`` have passed since the last one (mid-epoch, the loader position
in the commit, so a resume neither repeats nor skips a sample) and at the end of the epoch, and an evaluation on ``valid`` that keeps the best epoch by
``family.selection_metric()``. At the end: metrics on ``eval``, the exported model
(``model/model.pt`` + ``model/config.json``, loadable with plain torch) and
``result.json``, all written by rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import io
import json
import logging
import math
import os
import random
import sys
import time
import traceback
from typing import Any

import numpy as np
import torch

from trainflow.tasks.layout import (
    BEST_MODEL_DIR,
    MODEL_CONFIG_NAME,
    MODEL_DIR,
    MODEL_WEIGHTS_NAME,
    RESULT_NAME,
)
from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.settings import Settings, get_settings, redact_url
from trainflow.tasks.storage import Storage
from trainflow.trainers.checkpoint import Checkpointer, run_dir_url
from trainflow.trainers.config import TrainConfig
from trainflow.trainers.distributed import (
    NullLogger,
    World,
    barrier,
    init_distributed,
    shutdown_distributed,
    world_from_env,
)
from trainflow.trainers.family import ModelFamily
from trainflow.trainers.parallel import (
    SHARDED_EMBEDDINGS,
    SHARDED_EMBEDDINGS_A2A,
    RowSparseAdamW,
    clip_grad_norm,
    is_row_sparse,
    mark_row_sparse,
    memory_bytes,
    row_sharded_table,
    wrap_all_to_all_embeddings,
    wrap_sharded_embeddings,
)

log = logging.getLogger(__name__)

RESULT_FORMAT = "trainflow.result/1"


def run_training(
    family_cls: type[ModelFamily],
    family_config: Any,
    train_config: TrainConfig,
    *,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Train ``family_cls`` as ``train_config`` says; the same call on every rank.

    Returns:
        The result (also written to ``{run_dir}/result.json`` by rank 0).
    """
    world = world_from_env(train_config.device)
    init_distributed(world)
    try:
        return Trainer(family_cls, family_config, train_config, world, settings).run()
    except BaseException as exc:
        # The failed run's traceback holds its frames and they its model: a DDP (or a device
        # mesh) still alive when the group is destroyed holds it, and freeing it later (at exit)
        # can hang the rank, and with it torchrun and the task. The traceback keeps its lines.
        _clear_traceback_frames(exc)
        raise
    finally:
        gc.collect()
        shutdown_distributed()


def _clear_traceback_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames in ``exc``'s traceback and in those of the
    exceptions it was raised from (the frame still running is left alone)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


class MlflowLogger:
    """Rank 0's MLflow run: params once, step metrics, system metrics, final metrics.

    The MLflow run id is kept in the run directory, so a restart or an Airflow retry of the
    same DAG run keeps logging to the same MLflow run.
    """

    def __init__(self, config: TrainConfig, run_storage: Storage, settings: Settings) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(config.mlflow_tracking_uri or settings.mlflow_tracking_uri)
        run_id = config.mlflow_run_id
        if run_id is None and run_storage.exists("mlflow_run_id"):
            run_id = run_storage.read_bytes("mlflow_run_id").decode().strip()
        if run_id:
            self.run = mlflow.start_run(run_id=run_id, log_system_metrics=config.system_metrics)
        else:
            mlflow.set_experiment(config.mlflow_experiment)
            self.run = mlflow.start_run(
                run_name=f"{config.dag_id}/{config.run_id}", log_system_metrics=config.system_metrics
            )
            run_storage.commit_bytes("mlflow_run_id", self.run.info.run_id.encode())
        self.run_id = self.run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: (json.dumps(v) if isinstance(v, dict | list) else str(v))[:6000] for k, v in _flatten(params).items()}
        try:
            self.mlflow.log_params(flat)
        except Exception as exc:  # a resumed run logs them again; MLflow refuses changed values
            log.warning("MLflow params not (re)logged: %s", exc)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


class Trainer:
    """One training run on this rank (see the module docstring); use :func:`run_training`."""

    def __init__(
        self,
        family_cls: type[ModelFamily],
        family_config: Any,
        config: TrainConfig,
        world: World,
        settings: Settings | None = None,
    ) -> None:
        self.family_cls = family_cls
        self.family_config = family_config
        self.config = config
        self.world = world
        self.settings = settings or get_settings()
        self.run_url = config.run_dir or run_dir_url(config.dag_id, config.run_id, self.settings)
        self.run_storage = Storage(self.run_url, self.settings)
        self.device = torch.device(world.device)

    # setup --------------------------------------------------------------------------------
    def _parallelism(self) -> str:
        wanted = self.config.parallelism
        if self.world.world_size == 1 and wanted != "none":
            # DDP of one replica is plain training; FSDP (or row sharding) of one rank shards nothing.
            level = logging.INFO if wanted == "ddp" else logging.WARNING
            log.log(level, "parallelism=%r ignored: a world of one process trains without wrapping", wanted)
            return "none"
        if self.world.world_size > 1 and wanted == "none":
            raise ValueError(f"parallelism='none' cannot train on {self.world.world_size} ranks: "
                             f"use ddp, fsdp, sharded_embeddings or {SHARDED_EMBEDDINGS_A2A}")
        return wanted

    def _wrap(self, model: torch.nn.Module, family: ModelFamily, parallelism: str) -> torch.nn.Module:
        if parallelism == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            ignored = family.ddp_ignored(model)
            if ignored:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
            return DistributedDataParallel(model, device_ids=ids)
        if parallelism == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for sub in family.fsdp_modules(model):
                fully_shard(sub)
            fully_shard(model)
        if parallelism == SHARDED_EMBEDDINGS:
            tables = family.embedding_tables(model)
            if not tables:
                raise ValueError(f"parallelism='sharded_embeddings': the {family.name} family has no embedding "
                                 "tables to shard; use ddp or fsdp")
            return wrap_sharded_embeddings(model, tables, self.device)
        if parallelism == SHARDED_EMBEDDINGS_A2A:
            tables = family.embedding_tables(model)
            if not tables:
                raise ValueError(f"parallelism='{SHARDED_EMBEDDINGS_A2A}': the {family.name} family has no embedding "
                                 "tables to shard; use ddp or fsdp")
            return wrap_all_to_all_embeddings(model, tables, self.device)
        return model

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW if self.config.optimizer == "adamw" else torch.optim.Adam
        # Row-sharded tables (DTensor) and replicated parameters in separate groups: the
        # foreach kernels do not mix DTensor and plain tensors.
        params = list(model.parameters())
        betas = (self.config.adam_beta1, self.config.adam_beta2)
        # Tables whose rows the optimizer exchanges itself, or whose owned rows it updates.
        if any(is_row_sparse(p) or row_sharded_table(p) is not None for p in params):
            return RowSparseAdamW(params, lr=self.config.learning_rate, betas=betas,
                                  weight_decay=self.config.weight_decay)
        groups = [g for g in ([p for p in params if not _is_dtensor(p)], [p for p in params if _is_dtensor(p)]) if g]
        return cls([{"params": g} for g in groups], lr=self.config.learning_rate, betas=betas,
                   weight_decay=self.config.weight_decay)

    def _scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        cfg = self.config

        def factor(step: int) -> float:
            if cfg.warmup_steps and step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            if cfg.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
            if cfg.lr_schedule == "linear":
                return 1.0 - progress
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # run ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, world = self.config, self.world
        started = time.monotonic()
        _seed_everything(cfg.seed)
        micro = cfg.micro_batch_size(world.world_size)
        manifest = load_manifest(cfg.manifest_uri, self.settings)
        family = self.family_cls(self.family_config, manifest, world)
        parallelism = self._parallelism()
        raw = family.build_model().to(self.device)
        table_params = {f"{name}.{p}" for name, module in raw.named_modules()
                        if any(module is t for t in family.embedding_tables(raw))
                        for p, _ in module.named_parameters(recurse=False)}
        if parallelism == "none" and cfg.parallelism == SHARDED_EMBEDDINGS_A2A:
            # One rank owns every row: the same lazy Adam on the rows a step touched, without
            # the all-to-alls (sparse gradients, RowSparseAdamW), so 1 and N ranks train alike.
            mark_row_sparse(family.embedding_tables(raw))
        state_model = self._wrap(raw, family, parallelism)
        self._table_params = table_params
        model = torch.compile(state_model) if cfg.compile else state_model
        # Per-rank streams for dropout and the like, after the identical init.
        _seed_everything(cfg.seed + 7919 * world.rank)
        optimizer = self._optimizer(state_model)
        steps_per_epoch = max(1, family.num_train_samples(0) // cfg.batch_size)
        total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
        scheduler = self._scheduler(optimizer, total_steps)
        ckpt = Checkpointer(self.run_url, world, keep=cfg.keep_checkpoints, settings=self.settings)
        logger: Any = MlflowLogger(cfg, self.run_storage, self.settings) if (world.is_main and cfg.log_to_mlflow) else NullLogger()
        status = "FAILED"
        try:
            result = self._train(family, model, state_model, optimizer, scheduler, ckpt, logger, micro,
                                 parallelism, steps_per_epoch, total_steps, started)
            status = "FINISHED"
            return result
        finally:
            logger.end(status)

    def _train(self, family, model, state_model, optimizer, scheduler, ckpt, logger, micro,
               parallelism, steps_per_epoch, total_steps, started) -> dict[str, Any]:
        cfg, world = self.config, self.world
        state = {"epoch": 0, "position": 0, "step": 0, "samples": 0, "best": None, "history": [],
                 "losses": [], "train_seconds": 0.0}
        resumed_from = None
        keep_best = cfg.keep_best and not family.trains_on_valid
        if cfg.keep_best and not keep_best and world.is_main:
            log.warning("the family trains on 'valid' too: keeping the last epoch, not the best on valid "
                        "(a choice on trained-on data would leak)")
        latest = ckpt.latest_committed()
        if latest is not None:
            log.info("resuming from step %d (epoch %d) of %s", latest.step, latest.epoch, redact_url(latest.url))
            loaded = ckpt.load(latest, state_model, optimizer, scheduler=scheduler)
            loaded.pop("extra", None)
            state.update(loaded)
            resumed_from = latest.step
        logger.log_params({"train": cfg.to_dict(), "family": _as_dict(self.family_config),
                           "world_size": world.world_size, "num_nodes": world.num_nodes,
                           "parallelism_effective": parallelism, "family_name": family.name,
                           "dataset": manifest_tags(family.manifest)})
        logger.set_tags({"trainflow.dag_id": cfg.dag_id, "trainflow.run_id": cfg.run_id,
                         "trainflow.run_dir": redact_url(self.run_url), "trainflow.world_size": world.world_size})
        dtype = cfg.autocast_dtype
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        metric_key, mode = family.selection_metric()
        step, samples = state["step"], state["samples"]
        window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.monotonic()
        run_start = time.monotonic()
        steps_at_start = step
        train_seconds = state["train_seconds"]
        stop = cfg.max_steps is not None and step >= cfg.max_steps
        epoch = state["epoch"]
        warned_tail = False
        clock = CheckpointClock(cfg.checkpoint_every_minutes, world, self.device)
        while epoch < cfg.epochs and not stop:
            skip = state["position"] if epoch == state["epoch"] else 0
            model.train()
            position, accum, pending_save = skip, 0, False
            epoch_start = time.monotonic()
            batches = family.train_batches(epoch, micro, skip_batches=skip)
            if cfg.pin_memory:
                batches = _pinned(batches)
            for batch in batches:
                if pending_save:
                    self._save(ckpt, step, state_model, optimizer, scheduler, epoch, position, samples, state,
                               train_seconds + time.monotonic() - run_start)
                    clock.reset()
                    pending_save = False
                batch = _to_device(batch, self.device)
                last_micro = accum + 1 == cfg.grad_accum_steps
                with _grad_sync(state_model, parallelism, last_micro), autocast:
                    loss = family.loss(model, batch)
                    (loss / cfg.grad_accum_steps).backward()
                window_loss += loss.detach().float() / cfg.grad_accum_steps
                accum += 1
                position += 1
                if not last_micro:
                    continue
                if cfg.max_grad_norm is not None and parallelism in (SHARDED_EMBEDDINGS, SHARDED_EMBEDDINGS_A2A):
                    clip_grad_norm(list(state_model.parameters()), cfg.max_grad_norm)
                elif cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(state_model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                accum = 0
                step += 1
                samples += cfg.batch_size
                window_steps += 1
                if step % cfg.log_every_steps == 0:
                    mean_loss = _mean_across_ranks(window_loss / window_steps, world)
                    elapsed = time.monotonic() - window_start
                    rate = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                    remaining = max(0, total_steps - step)
                    overall = (step - steps_at_start) / max(time.monotonic() - run_start, 1e-9)
                    eta = remaining / overall if overall > 0 else float("nan")
                    lr = scheduler.get_last_lr()[0]
                    if world.is_main:
                        log.info("epoch %d/%d step %d/%d (%.0f%%) loss %.5f lr %.2e samples/s %.0f eta %s",
                                 epoch + 1, cfg.epochs, step, total_steps, 100.0 * step / max(total_steps, 1),
                                 mean_loss, lr, rate, _fmt_seconds(eta))
                    state["losses"].append([step, mean_loss])
                    logger.log_metrics({"train_loss": mean_loss, "learning_rate": lr, "samples_per_s": rate,
                                        "epoch": epoch}, step=step)
                    window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.monotonic()
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                    pending_save = True  # written before the next batch; the epoch-end save supersedes it
                elif clock.due(step):
                    if world.is_main:
                        log.info("%.2f min since the last checkpoint: checkpointing mid-epoch after step %d",
                                 clock.minutes_since(), step)
                    pending_save = True  # like the step-based one: before the next batch
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stop = True
                    break
            if accum:
                if not warned_tail:
                    log.warning("epoch %d ended with %d micro batches short of a full accumulation: dropped",
                                epoch, cfg.grad_accum_steps - accum)
                    warned_tail = True
                optimizer.zero_grad(set_to_none=True)
            epoch_seconds = time.monotonic() - epoch_start
            metrics = self._evaluate(family, model, "valid")
            better = _is_better(metrics.get(metric_key), state["best"], mode)
            entry = {"epoch": epoch, "step": step, "valid": metrics, "seconds": round(epoch_seconds, 3)}
            state["history"].append(entry)
            logger.log_metrics({f"valid_{k}": v for k, v in metrics.items()}, step=step)
            if world.is_main:
                log.info("epoch %d/%d done: valid %s%s", epoch + 1, cfg.epochs, _fmt_metrics(metrics),
                         " (best so far)" if better else "")
            if better:
                state["best"] = {"epoch": epoch, "step": step, "metric": metric_key, "value": metrics.get(metric_key),
                                 "valid": metrics}
                self._write_model(family, state_model, BEST_MODEL_DIR)
            epoch += 1
            position = 0 if not stop else position
            self._save(ckpt, step, state_model, optimizer, scheduler, epoch if not stop else epoch - 1,
                       position if stop else 0, samples, state, train_seconds + time.monotonic() - run_start)
            clock.reset()
        train_seconds += time.monotonic() - run_start
        last_epoch = epoch - 1
        if keep_best and state["best"] is not None and state["best"]["epoch"] != last_epoch:
            log.info("restoring the weights of the best epoch %d (%s %s)", state["best"]["epoch"], metric_key,
                     state["best"]["value"])
            self._load_best(state_model)
        eval_metrics = self._evaluate(family, model, "eval")
        logger.log_metrics({**eval_metrics, **{f"best_valid_{k}": v for k, v in
                                               (state["best"] or {}).get("valid", {}).items()}}, step=step)
        model_uri = self._write_model(family, state_model, MODEL_DIR)
        trained_steps = step - steps_at_start
        memory = self._memory(state_model, optimizer)
        logger.log_metrics({f"rank0_{k}": v for k, v in memory.items() if not isinstance(v, list)}, step=step)
        result = {
            "format": RESULT_FORMAT,
            "family": family.name,
            "metrics": {"eval": eval_metrics, "valid_best": (state["best"] or {}).get("valid", {})},
            "best_epoch": (state["best"] or {}).get("epoch"),
            # the epoch whose weights are exported: the best on valid, or the last one
            "kept_epoch": (state["best"] or {}).get("epoch") if keep_best and state["best"] else last_epoch,
            "selection_metric": {"key": metric_key, "mode": mode},
            "history": state["history"],
            "losses": state["losses"][-1000:],
            "model_uri": model_uri,
            "checkpoint_uri": ckpt.latest_committed().url if ckpt.latest_committed() else None,
            "run_dir": redact_url(self.run_url),
            "manifest_uri": redact_url(family.manifest.uri),
            "steps": step,
            "epochs": cfg.epochs,
            "samples": samples,
            "samples_per_s": round(trained_steps * cfg.batch_size / max(time.monotonic() - run_start, 1e-9), 2),
            "world_size": world.world_size,
            "num_nodes": world.num_nodes,
            "parallelism": parallelism,
            "device": world.device,
            "precision": "bf16" if cfg.autocast_dtype is not None else "fp32",
            "memory": memory,
            "resumed_from_step": resumed_from,
            "train_seconds": round(train_seconds, 3),
            "wall_time_s": round(time.monotonic() - started, 3),
            "mlflow_run_id": logger.run_id if isinstance(logger, MlflowLogger) else None,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        if world.is_main:
            self.run_storage.commit_bytes(RESULT_NAME, (json.dumps(result, indent=2) + "\n").encode())
            log.info("result written to %s", redact_url(self.run_storage.url(RESULT_NAME)))
        barrier(world)
        return result

    # pieces -------------------------------------------------------------------------------
    def _save(self, ckpt, step, state_model, optimizer, scheduler, epoch, position, samples, state, seconds) -> None:
        train_state = {"epoch": epoch, "position": position, "step": step, "samples": samples,
                       "best": state["best"], "history": state["history"], "losses": state["losses"][-1000:],
                       "train_seconds": seconds}
        ckpt.save(step, state_model, optimizer, epoch=epoch, train_state=train_state, scheduler=scheduler)
        _inject_fault_after_commit(step, self.world)

    def _memory(self, state_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Bytes of parameters and optimizer state each rank holds (local shards), in total and
        for the family's embedding tables; ``*_per_rank`` lists every rank (collective)."""
        inner = state_model.module if hasattr(state_model, "module") else state_model
        mine = memory_bytes(inner, optimizer, self._table_params)
        ranks = [mine]
        if self.world.distributed:
            import torch.distributed as dist

            ranks = [None] * self.world.world_size
            dist.all_gather_object(ranks, mine)
        out: dict[str, Any] = dict(mine)
        for key in mine:
            out[f"{key}_per_rank"] = [r[key] for r in ranks]
        return out

    def _evaluate(self, family: ModelFamily, model: torch.nn.Module, split: str) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = family.evaluate(model, split)
        model.train()
        return {k: float(v) for k, v in metrics.items()}

    def _full_state(self, state_model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(state_model, options=options)

    def _write_model(self, family: ModelFamily, state_model: torch.nn.Module, folder: str) -> str:
        """Gather the full weights (collective) and write ``{folder}/model.pt`` + ``config.json``."""
        state = self._full_state(state_model)
        store = self.run_storage.child(folder)
        if self.world.is_main:
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
            store.write_bytes(MODEL_WEIGHTS_NAME, buffer.getvalue())
            config = {
                "pipeline": family.manifest.kind,
                "family": family.name,
                "family_config": _as_dict(self.family_config),
                "export_config": family.export_config(),
                "train_config": self.config.to_dict(),
                "torch_version": torch.__version__,
            }
            store.commit_bytes(MODEL_CONFIG_NAME, (json.dumps(config, indent=2, default=str) + "\n").encode())
        barrier(self.world)
        return redact_url(store.url())

    def _load_best(self, state_model: torch.nn.Module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        distributed = self.world.distributed
        if self.world.is_main or not distributed:
            raw = self.run_storage.read_bytes(f"{BEST_MODEL_DIR}/{MODEL_WEIGHTS_NAME}")
            state = torch.load(io.BytesIO(raw), weights_only=True)
        else:
            state = {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
        set_model_state_dict(state_model, state, options=options)


def load_exported_model(run_dir: str, settings: Settings | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The exported weights and config of a finished run (plain torch, no process group)."""
    store = Storage(run_dir, settings).child(MODEL_DIR)
    state = torch.load(io.BytesIO(store.read_bytes(MODEL_WEIGHTS_NAME)), weights_only=True)
    return state, json.loads(store.read_bytes(MODEL_CONFIG_NAME))


def manifest_tags(manifest) -> dict[str, Any]:
    return {"uri": redact_url(manifest.uri), "name": manifest.name, "version": manifest.version}


# helpers ----------------------------------------------------------------------------------
CLOCK_CHECK_STEPS = 10
"""On several ranks, how often (optimizer steps) the ranks compare their checkpoint clocks."""


class CheckpointClock:
    """When a time-based mid-epoch checkpoint is due (``checkpoint_every_minutes``).

    A checkpoint is collective, so every rank must decide the same at the same step. Alone,
    the clock is read after every optimizer step; on several ranks, every
    :data:`CLOCK_CHECK_STEPS` steps the ranks all-reduce (max) a "due" flag, so any rank
    whose clock has run out makes all of them save at that step (one tiny collective per ten
    steps, no per-step synchronisation).

    Args:
        minutes: Interval; 0 disables time-based checkpoints.
        world: This process's rank information.
        device: Where the flag lives for the all-reduce (the NCCL backend needs CUDA tensors).
        clock: Monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, minutes: float, world: World, device: torch.device, clock=time.monotonic) -> None:
        self.seconds = float(minutes) * 60.0
        self.world = world
        self.device = device
        self.clock = clock
        self.since = clock()

    def reset(self) -> None:
        """A checkpoint was just committed: the interval starts again."""
        self.since = self.clock()

    def minutes_since(self) -> float:
        return (self.clock() - self.since) / 60.0

    def due(self, step: int) -> bool:
        """Whether to checkpoint after optimizer step ``step`` (the same answer on every rank)."""
        if self.seconds <= 0:
            return False
        if not self.world.distributed:
            return self.clock() - self.since >= self.seconds
        if step % CLOCK_CHECK_STEPS:
            return False
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.clock() - self.since >= self.seconds else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


FAULT_STEP_ENV = "TRAINFLOW_TEST_FAIL_AFTER_COMMIT_STEP"
FAULT_MARKER_ENV = "TRAINFLOW_TEST_FAULT_MARKER"


def _inject_fault_after_commit(step: int, world: World) -> None:
    """Test hook, inert unless ``TRAINFLOW_TEST_FAIL_AFTER_COMMIT_STEP`` is set: once a
    checkpoint at or after that step is committed, every rank exits with status 17, once
    (the file ``TRAINFLOW_TEST_FAULT_MARKER`` records that it happened). Lets tests fail a
    training after a commit the way a killed Airflow task does, then check that the retry
    resumes from that commit."""
    raw = os.environ.get(FAULT_STEP_ENV)
    if not raw or step < int(raw):
        return
    marker = os.environ.get(FAULT_MARKER_ENV) or ""
    if not marker:
        raise ValueError(f"{FAULT_STEP_ENV} needs {FAULT_MARKER_ENV} (a file path)")
    happened = os.path.exists(marker)
    barrier(world)  # every rank looked before rank 0 writes the marker
    if happened:
        return
    if world.is_main:
        with open(marker, "w") as handle:
            handle.write(str(step))
        log.error("test fault injection: exiting after the committed checkpoint of step %d", step)
    barrier(world)
    sys.stdout.flush()
    os._exit(17)


@contextlib.contextmanager
def _grad_sync(model: torch.nn.Module, parallelism: str, sync: bool):
    if parallelism in ("ddp", SHARDED_EMBEDDINGS, SHARDED_EMBEDDINGS_A2A) and not sync:
        with model.no_sync():
            yield
        return
    if parallelism == "fsdp":
        model.set_requires_gradient_sync(sync)
    yield


def _is_dtensor(value: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _pinned(batches, depth: int = 2):
    """``batches`` with their tensors copied into pinned memory on a background thread
    (``depth`` batches ahead), so that ``.to(cuda, non_blocking=True)`` overlaps compute."""
    import queue
    import threading

    done = object()
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for batch in batches:
                if not put({k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}):
                    return
            put(done)
        except BaseException as exc:  # re-raised on the training thread
            put(exc)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    thread = threading.Thread(target=fill, name="pin-memory", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _mean_across_ranks(value: torch.Tensor, world: World) -> float:
    if world.distributed:
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / world.world_size
    return float(value)


def _is_better(value: float | None, best: dict[str, Any] | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return best is None
    if best is None or best.get("value") is None:
        return True
    return value > best["value"] if mode == "max" else value < best["value"]


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(dt.timedelta(seconds=int(seconds)))


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items()))


def _as_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config) if isinstance(config, dict) else {"value": repr(config)}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# entry points -----------------------------------------------------------------------------
def read_run_config(path_or_url: str) -> dict[str, Any]:
    """A run configuration file (``{"train": {...}, "family": {...}}``) from a local path or any
    storage URL (the train step writes it into the run directory, which every node can read)."""
    if "://" in path_or_url:
        from trainflow.tasks.storage import Storage

        base, _, name = path_or_url.rstrip("/").rpartition("/")
        return json.loads(Storage(base).read_bytes(name))
    with open(path_or_url) as handle:
        return json.load(handle)


def parse_args(argv: list[str] | None, family_config_cls: type) -> tuple[Any, TrainConfig]:
    """``--config FILE`` (JSON ``{"train": {...}, "family": {...}}``) plus overrides
    ``--train.FIELD=VALUE`` / ``--family.FIELD=VALUE`` (values parsed as JSON, else text)."""
    parser = argparse.ArgumentParser(description="Train a trainflow model family (alone or under torchrun).")
    parser.add_argument("--config", help="JSON file with 'train' and 'family' sections")
    known, rest = parser.parse_known_args(argv)
    data: dict[str, dict[str, Any]] = {"train": {}, "family": {}}
    if known.config:
        loaded = read_run_config(known.config)
        data["train"].update(loaded.get("train", {}))
        data["family"].update(loaded.get("family", {}))
    for arg in rest:
        key, sep, raw = arg.lstrip("-").partition("=")
        section, _, field = key.partition(".")
        if not sep or section not in data or not field:
            parser.error(f"expected --train.FIELD=VALUE or --family.FIELD=VALUE, got {arg!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        data[section][field.replace("-", "_")] = value
    return family_config_cls(**data["family"]), TrainConfig.from_dict(data["train"])


def main(family_cls: type[ModelFamily], family_config_cls: type, argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of a family module (``python -m trainflow.trainers.<family>``), alone or under torchrun.

    Errors are recorded with torchelastic's ``@record`` so the launcher can say which rank
    failed and why.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def _main() -> dict[str, Any]:
        rank = os.environ.get("RANK", "0")
        logging.basicConfig(
            level=get_settings().log_level,
            format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
            stream=sys.stdout,
        )
        family_config, train_config = parse_args(argv, family_config_cls)
        return run_training(family_cls, family_config, train_config)

    return _main()
