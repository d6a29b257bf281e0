from __future__ import annotations

import pytest

from trainflow.tasks.params import ParamError, param_specs, validate_params


@pytest.mark.parametrize("kind", ["recommendation", "driving"])
def test_defaults_are_valid(kind):
    values = validate_params({}, kind, cpu_count=2)
    assert values == {k: s["default"] for k, s in param_specs(kind).items()}


@pytest.mark.parametrize(
    "params,field,match",
    [
        ({"epochs": 0}, "epochs", "below the minimum"),
        ({"epochs": 2.5}, "epochs", "expected integer"),
        ({"epochs": True}, "epochs", "boolean"),
        ({"parallelism": "zero3"}, "parallelism", "not one of"),
        ({"learning_rate": 0}, "learning_rate", "greater than 0"),
        ({"source_url": ""}, "source_url", "empty"),
        ({"dataset_name": "a/../b"}, "dataset_name", "does not match"),
        ({"nproc_per_node": 3}, "nproc_per_node", "has 2 CPUs"),
        ({"device": "cuda", "nproc_per_node": 1}, "device", "0"),
        ({"parallelism": "none"}, "parallelism", "one process"),
        ({"batch_size": 1}, "batch_size", "world size 2"),
        ({"epochz": 3}, "epochz", "unknown parameter"),
        ({"nnodes": 2, "batch_size": 3}, "batch_size", "world size 4"),
        ({"rdzv_endpoint": "no-port"}, "rdzv_endpoint", "does not match"),
        ({"rdzv_endpoint": "node0:99999"}, "rdzv_endpoint", "not in 1-65535"),
        ({"rdzv_join_timeout_s": 1}, "rdzv_join_timeout_s", "below the minimum"),
        ({"launcher": "slurm"}, "launcher", "not one of"),
        ({"launcher": "kubernetes"}, "kubernetes_image", "needs the image"),
        ({"launcher": "kubernetes", "kubernetes_image": "a b"}, "kubernetes_image", "whitespace"),
        ({"launcher": "kubernetes", "kubernetes_image": "img:1", "device": "cuda", "kubernetes_gpus_per_node": 1},
         "kubernetes_gpus_per_node", "one GPU each"),
        ({"launcher": "kubernetes", "kubernetes_image": "img:1", "rdzv_endpoint": "h:1"}, "rdzv_endpoint", "leave it empty"),
        ({"launcher": "kubernetes", "kubernetes_image": "img:1", "kubernetes_namespace": "Bad_NS"},
         "kubernetes_namespace", "does not match"),
        ({"launcher": "kubernetes", "kubernetes_image": "img:1", "kubernetes_memory_per_node": "lots"},
         "kubernetes_memory_per_node", "does not match"),
        ({"model_options": {"Bad-Key": 1}}, "model_options", "not a setting name"),
        ({"model_options": {"seed": 1}}, "model_options", "its own param"),
        ({"model_options": [1]}, "model_options", "expected object"),
    ],
)
def test_bad_values_name_the_field(params, field, match):
    with pytest.raises(ParamError, match=match) as info:
        validate_params(params, "recommendation", cpu_count=2)
    assert info.value.field == field
    assert f"param {field!r}" in str(info.value)


def test_multi_node_and_kubernetes_values_pass():
    values = validate_params({"nnodes": 2, "rdzv_endpoint": "node-0.example:29400", "rdzv_join_timeout_s": 60},
                             "recommendation", cpu_count=2)
    assert values["nnodes"] == 2 and values["rdzv_endpoint"] == "node-0.example:29400"
    # The pods' machines count, not this one's: 8 CUDA processes per node pass here, GPUs default to them.
    values = validate_params({"launcher": "kubernetes", "kubernetes_image": " reg/trainflow:1 ", "device": "cuda",
                              "nproc_per_node": 8, "nnodes": 4, "kubernetes_memory_per_node": "64Gi"},
                             "recommendation", cpu_count=2, cuda_devices=0)
    assert values["kubernetes_image"] == "reg/trainflow:1" and values["kubernetes_gpus_per_node"] == 8
    values = validate_params({"launcher": "kubernetes", "kubernetes_image": "img:1"}, "driving", cpu_count=2)
    assert values["kubernetes_gpus_per_node"] == 0


def test_cuda_with_enough_devices_passes():
    values = validate_params({"device": "cuda", "nproc_per_node": 2}, "recommendation", cpu_count=2, cuda_devices=2)
    assert values["device"] == "cuda"


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown pipeline 'weather' \(registered: .*recommendation"):
        param_specs("weather")


def test_family_args_presets_sizes_and_options():
    from trainflow.tasks.pipeline import family_args

    values = validate_params({"model": "neumf", "model_size": 32}, "recommendation", cpu_count=2)
    args = family_args("recommendation", values)
    assert "--family.gmf_factors=32" in args and "--family.mlp_layers=[64, 32, 16, 8]" in args
    assert "--family.num_negatives=4" in args
    values = validate_params({"model_options": {"max_seq_len": 100, "dropout": 0.1}}, "recommendation", cpu_count=2)
    args = family_args("recommendation", values)
    assert "--family.model=\"sasrec\"" in args and "--family.hidden_size=64" in args
    assert args.count("--family.max_seq_len=100") == 1 and "--family.max_seq_len=50" not in args
    assert '--family.loss="softmax"' in args and args.count("--family.num_negatives=256") == 1  # SASRec's preset
    values = validate_params({"model_options": {"loss": "bce", "num_negatives": 1}}, "recommendation", cpu_count=2)
    args = family_args("recommendation", values)
    assert '--family.loss="bce"' in args and args.count("--family.num_negatives=1") == 1
    assert '--family.loss="softmax"' not in args and "--family.num_negatives=256" not in args
    values = validate_params({"model": "mlp"}, "driving", cpu_count=2)
    assert "--family.max_neighbours=0" in family_args("driving", values)
    assert "--family.context_dim=0" in family_args("driving", values)


@pytest.mark.parametrize(
    ("conf", "field", "match"),
    [
        ({"model_options": {"dropuot": 0.1}}, "model_options", r"'dropuot' is no setting of RecommendationConfig \(did you mean 'dropout'"),
        ({"model_options": {"dropout": 1.5}}, "model_options", "dropout"),
        ({"model_options": {"loss": "bpr"}}, "model_options", "loss must be one of bce, softmax"),
        ({"batch_size": 255, "nproc_per_node": 2}, "batch_size", "not a multiple of the world size 2"),
    ],
)
def test_bad_run_config_fails_at_the_door_naming_the_field(conf, field, match):
    """What only the trainer found before (inside torchrun, retried) fails the validation."""
    with pytest.raises(ParamError, match=match) as info:
        validate_params(conf, "recommendation", cpu_count=2)
    assert info.value.field == field


def test_driving_model_options_are_checked_against_its_config():
    with pytest.raises(ParamError, match="no setting of DrivingConfig"):
        validate_params({"model_options": {"hidden_size": 8}}, "driving", cpu_count=2)
    assert validate_params({"model_options": {"hidden_dim": 8}}, "driving", cpu_count=2)["model_options"] == {"hidden_dim": 8}


def test_parallelism_precision_and_compile():
    specs = param_specs("recommendation")
    assert "sharded_embeddings" in specs["parallelism"]["schema"]["enum"]
    assert "sharded_embeddings" not in param_specs("driving")["parallelism"]["schema"]["enum"]  # no tables
    values = validate_params({"parallelism": "sharded_embeddings", "precision": "bf16", "compile": True},
                             "recommendation", cpu_count=2)
    assert (values["parallelism"], values["precision"], values["compile"]) == ("sharded_embeddings", "bf16", True)
    for params, kind, field in [({"parallelism": "sharded_embeddings"}, "driving", "parallelism"),
                                ({"precision": "fp16"}, "recommendation", "precision"),
                                ({"compile": "yes"}, "recommendation", "compile")]:
        with pytest.raises(ParamError) as err:
            validate_params(params, kind, cpu_count=2)
        assert err.value.field == field


@pytest.mark.parametrize("name", ["team's model", 'a "quoted" name', "team/model", "team:model", " leading"])
def test_a_registered_model_name_that_mlflow_filters_or_uris_cannot_take_is_refused_at_the_door(name):
    """Before: a name with ``'`` passed, trained for minutes, then broke the registry's filter
    string and left an empty registered model behind."""
    with pytest.raises(ParamError, match="does not match") as info:
        validate_params({"registered_model_name": name}, "recommendation", cpu_count=2)
    assert info.value.field == "registered_model_name"
    assert validate_params({"registered_model_name": "team_model-v2.1 (eu)"}, "recommendation",
                           cpu_count=2)["registered_model_name"] == "team_model-v2.1 (eu)"


def test_the_kubernetes_start_timeout_is_a_declared_param():
    spec = param_specs("recommendation")["kubernetes_start_timeout_s"]
    assert spec["default"] == 900 and spec["description"] and spec["schema"]["type"] == "integer"
    values = validate_params({"launcher": "kubernetes", "kubernetes_image": "img:1", "kubernetes_start_timeout_s": 120},
                             "recommendation", cpu_count=2)
    assert values["kubernetes_start_timeout_s"] == 120
    with pytest.raises(ParamError) as info:
        validate_params({"kubernetes_start_timeout_s": 0}, "recommendation", cpu_count=2)
    assert info.value.field == "kubernetes_start_timeout_s"
def test_checkpoint_every_minutes_reaches_the_trainer_config():
    from trainflow.tasks.pipeline import run_config
    from trainflow.trainers.config import TrainConfig

    spec = param_specs("recommendation")["checkpoint_every_minutes"]
    assert spec["default"] == 10 and spec["schema"]["minimum"] == 0 and "epoch ends" in spec["description"]
    dataset = {"manifest_uri": "file:///data/_manifest.json", "version": "v"}
    for conf, expected in [({}, 10), ({"checkpoint_every_minutes": 0.5}, 0.5), ({"checkpoint_every_minutes": 0}, 0)]:
        values = validate_params(conf, "recommendation", cpu_count=2)
        config = run_config("recommendation", values, dataset, run_dir="file:///runs/x", dag_id="d", run_id="r",
                            settings=None, mlflow_run_id="m")
        assert TrainConfig.from_dict(config["train"]).checkpoint_every_minutes == expected
    for bad, match in [(-1, "below the minimum"), ("often", "expected number"), (True, "boolean")]:
        with pytest.raises(ParamError, match=match) as err:
            validate_params({"checkpoint_every_minutes": bad}, "driving", cpu_count=2)
        assert err.value.field == "checkpoint_every_minutes"


def test_the_learning_rate_schedule_is_a_param_whose_default_is_the_pipelines_own():
    """lr_schedule / warmup_steps reach the trainer's config; the default is what the pipeline
    tuned (driving: cosine after 50 warmup steps; recommendation: constant), so a conf written
    before means what it meant."""
    from trainflow.tasks.params import SCHEDULES
    from trainflow.tasks.pipeline import run_config
    from trainflow.trainers import config as trainer_config
    from trainflow.trainers.config import TrainConfig

    assert SCHEDULES == trainer_config.SCHEDULES
    dataset = {"manifest_uri": "file:///data/_manifest.json", "version": "v"}

    def train(conf, pipeline):
        values = validate_params(conf, pipeline, cpu_count=2)
        config = run_config(pipeline, values, dataset, run_dir="file:///runs/x", dag_id="d", run_id="r",
                            settings=None, mlflow_run_id="m")
        cfg = TrainConfig.from_dict(config["train"])
        return cfg.lr_schedule, cfg.warmup_steps

    assert param_specs("driving")["lr_schedule"]["default"] == "cosine"
    assert param_specs("recommendation")["lr_schedule"]["default"] == "constant"
    assert train({}, "driving") == ("cosine", 50)
    assert train({}, "recommendation") == ("constant", 0)
    assert train({"lr_schedule": "cosine", "warmup_steps": 100}, "recommendation") == ("cosine", 100)
    assert train({"lr_schedule": "linear", "warmup_steps": 0}, "driving") == ("linear", 0)
    assert param_specs("recommendation")["adam_beta2"]["default"] == 0.999
    config = run_config("recommendation", validate_params({"adam_beta2": 0.98}, "recommendation", cpu_count=2),
                        dataset, run_dir="file:///runs/x", dag_id="d", run_id="r", settings=None, mlflow_run_id="m")
    assert TrainConfig.from_dict(config["train"]).adam_beta2 == 0.98
    for bad, field in [({"lr_schedule": "step"}, "lr_schedule"), ({"warmup_steps": -1}, "warmup_steps"),
                       ({"warmup_steps": 1.5}, "warmup_steps"), ({"adam_beta2": 1}, "adam_beta2"),
                       ({"adam_beta2": -0.5}, "adam_beta2")]:
        with pytest.raises(ParamError) as err:
            validate_params(bad, "recommendation", cpu_count=2)
        assert err.value.field == field
