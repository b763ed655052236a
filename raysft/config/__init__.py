"""The typed configuration of a train run: YAML in, validated pydantic models out.

- raysft/config/schema.py: the tree (`Config` and its sections), each field's docstring its help text;
- raysft/config/rules.py: rules that span sections, checked before Ray starts (cross-field needs, the batch
  against the data, the model's positions and module names, what a resume may change);
- raysft/config/loading.py: YAML, `--set` overrides, all problems at once with did-you-mean; config.yaml out;
- raysft/config/metrics.py: metric names and which way each is better;
- raysft/config/paths.py: local paths made absolute, URIs told apart.

(A sweep's config, which holds one of these as its base, is in raysft.tune.config.)
"""

from raysft.config.loading import (
    apply_overrides,
    flatten,
    load_config,
    load_yaml_text,
    parse_config,
    public_tree,
    read_yaml,
    resolve_data_paths,
    set_dotted,
    to_yaml,
    validate_section,
)
from raysft.config.metrics import (
    EVAL_LOSS,
    EVAL_PREFIX,
    HIDDEN_METRICS,
    LOSS_METRICS,
    is_evaluation_metric,
    loss_metrics,
    metric_mode,
    unknown_metric,
)
from raysft.config.paths import absolute_path, default_cache_root, is_uri, output_base, uri_scheme, with_absolute_paths
from raysft.config.rules import check_batch_fits, global_batch_rows
from raysft.config.schema import (
    Config,
    DataConfig,
    DataFormat,
    EarlyStoppingConfig,
    EvalConfig,
    GenerateConfig,
    GenerateMetricConfig,
    GenerateMetricType,
    LoraConfig,
    ModelConfig,
    Normalizer,
    ScalingConfig,
    Section,
    SectionT,
    SourceConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "EVAL_LOSS", "EVAL_PREFIX", "HIDDEN_METRICS", "LOSS_METRICS", "Config", "DataConfig", "DataFormat",
    "EarlyStoppingConfig", "EvalConfig", "GenerateConfig", "GenerateMetricConfig", "GenerateMetricType",
    "LoraConfig", "ModelConfig", "Normalizer", "ScalingConfig", "Section", "SectionT", "SourceConfig",
    "TrackingConfig", "TrainConfig", "absolute_path", "apply_overrides", "check_batch_fits", "default_cache_root",
    "flatten", "global_batch_rows", "is_evaluation_metric", "is_uri", "load_config", "load_yaml_text",
    "loss_metrics", "metric_mode", "output_base", "parse_config", "public_tree", "read_yaml", "resolve_data_paths",
    "set_dotted", "to_yaml", "unknown_metric", "uri_scheme", "validate_section", "with_absolute_paths",
]  # fmt: skip
