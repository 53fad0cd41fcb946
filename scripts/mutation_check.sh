#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules where a silent bug changes results, each against its targeted tests.
# Not part of CI: it is slow (minutes per module on 2 cores). Install with: pip install -e '.[mutation]'
#
#   bash scripts/mutation_check.sh                    # every module below, in priority order
#   bash scripts/mutation_check.sh objective metrics  # some of them
#   MUTATION_TIMEOUT=1200 bash scripts/mutation_check.sh guards   # seconds per module (default 1800)
#   MUTATION_GLOBS="$(cut -d: -f1 build/mutation/objective/survivors.txt)" bash scripts/mutation_check.sh objective
#     MUTATION_TAG=recheck                            # re-check only some mutants (e.g. after adding tests)
#
# mutmut derives module names from file paths, and our import package is mapped onto top-level folders
# (train/ is qwen_image_lora.train), so each run works on a staged copy laid out as the import names are.
# Prints "module killed/decided score, timeouts" per module and leaves each module's survivors in
# build/mutation/<module>/survivors.txt (`mutmut show <name>` inside build/mutation/<module> shows a diff).
set -euo pipefail -f  # -f: the mutant-name globs below are for mutmut, not the shell
cd "$(dirname "$0")/.."
ROOT=$PWD
MUTMUT=${MUTMUT:-$ROOT/.venv/bin/mutmut}
TIMEOUT=${MUTATION_TIMEOUT:-1800}
CHILDREN=${MUTATION_CHILDREN:-2}
# Seconds added to mutmut's per-mutant timeout (15x the recorded test time + this). The recorded time leaves out
# fixture set-up (a tiny model loads in seconds), so mutmut's default of 1 s ends slow but passing runs early.
TIMEOUT_CONSTANT=${MUTATION_TIMEOUT_CONSTANT:-20}
# One intra-op thread: mutmut forks a child per mutant from a process whose OpenMP pool already ran, and such
# children hung until the timeout (every objective.py mutant was a "timeout"; 5 of 5 decided in 17 s with this).
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# module -> "staged source file | targeted tests | functions to mutate (mutant-name globs; empty = all) |
# tests to leave out (pytest -k)". The globs keep each run on the maths the issue names: the EMA and the optimizer
# builder of optim.py, the latent and packing functions of model.py, the API-key check of guards.py, and the colour,
# SSIM/PSNR, text and interval maths of metrics.py (not the OCR and CLIP wrappers, whose tests load models).
METRICS_FNS="to_rgb_array _same_shape hex_to_lab _kmeans dominant_colours palette_distance nearest_palette_distance
  preservation quoted_text edit_distance _squash text_accuracy _words_found mean_ci paired_difference_ci"
MODEL_FNS="image_to_pixels encode_latents pack unpack pad_prompt_embeds split_prompt_embeds predict_velocity max_aspect"
declare -A MODULES=(
  [objective]="qwen_image_lora/objective.py|tests/test_train_objective.py||not lower_the_loss"
  [optim]="qwen_image_lora/train/optim.py|tests/test_train_optim.py|*ǁLoRAEMAǁ* *.x_build_optimizer__mutmut_* *.x__fusable__mutmut_*|"
  [guards]="qwen_image_lora/train/guards.py|tests/test_train_guards.py||"
  [metrics]="qwen_image_lora/eval/metrics.py|tests/test_eval_metrics_reference.py tests/test_eval_metrics.py|$(printf '*.x_%s__mutmut_* ' $METRICS_FNS)|not ocr and not clip and not alignment"
  [buckets]="qwen_image_lora/data/buckets.py|tests/test_data_buckets.py||"
  [urls]="qwen_image_lora/inference/urls.py|tests/test_server.py tests/test_faults_server.py||"
  [model]="qwen_image_lora/model.py|tests/test_model_packing.py tests/test_model.py tests/test_sizing.py|$(printf '*.x_%s__mutmut_* ' $MODEL_FNS)|"
  [formats]="qwen_image_lora/adapter_format.py|tests/test_adapter_format.py tests/test_adapter_sources.py tests/test_inference_adapters.py||"
  [adapter_checks]="qwen_image_lora/adapter_checks.py|tests/test_adapter_format.py||"
  [export]="qwen_image_lora/train/export.py|tests/test_train_adapter.py tests/test_inference_adapters.py||"
  [auth]="qwen_image_lora/inference/guards.py|tests/test_server.py tests/test_faults_server.py|*ǁKeyCheckǁ*|"
  [summary]="qwen_image_lora/eval/summary.py|tests/test_eval_report.py tests/test_eval_metrics.py||"
  [lora_layer]="qwen_image_lora/train/adapter.py|tests/test_lora_layer.py tests/test_train_adapter.py|*ǁLeanLoraLinearǁ* *.x_add_lora__mutmut_*|"
  [hub]="qwen_image_lora/hub.py|tests/test_hub.py tests/test_adapter_sources.py|*.x_is_cached__mutmut_* *.x_check_hub_repo__mutmut_* *.x_check_adapter_hub__mutmut_* *.x_check_pretrained__mutmut_* *.x__is_local__mutmut_* *.x_check_source__mutmut_* *.x_is_hub_id__mutmut_* *.x_check_adapters__mutmut_*|"
  [screening]="qwen_image_lora/data/screening.py|tests/test_data_verdict_state.py tests/test_faults_data.py||not read_only_cache_warns_once"
  [comfy_mlp]="qwen_image_lora/comfy_mlp.py|tests/test_adapter_format.py||"
  [colour]="qwen_image_lora/images.py|tests/test_images.py tests/test_image_settings.py|*.x__srgb_transform__mutmut_* *.x_converts_colours__mutmut_* *.x__header_facts__mutmut_* *.x__read_header_facts__mutmut_*|not decode_holds and not admitted and not overrun"
  [image_files]="qwen_image_lora/image_files.py|tests/test_images.py tests/test_image_settings.py|*.x_encode_image__mutmut_*|not decode_holds and not admitted and not overrun"
  [masking]="qwen_image_lora/inference/masking.py|tests/test_inference_masking.py|*.x_feathered_alpha__mutmut_* *.x_composite__mutmut_* *.x__mix_premultiplied__mutmut_*|not cli and not batch_job and not said_once"
  [mask_rules]="qwen_image_lora/inference/mask_rules.py|tests/test_inference_masking.py tests/test_server_masks_layers.py|*.x_prepare_mask__mutmut_* *.x__alpha_only__mutmut_* *.x_check_aspect__mutmut_*|not cli and not batch_job and not said_once"
  [batch_names]="qwen_image_lora/inference/jobs.py|tests/test_batch_outputs.py tests/test_inference_cli.py|*.x__safe_name__mutmut_* *.x__claim_id__mutmut_*|"
)
ORDER=(objective optim guards metrics buckets urls model formats adapter_checks export auth summary screening lora_layer hub comfy_mlp colour image_files masking mask_rules batch_names)
[ $# -gt 0 ] && ORDER=("$@")

stage() {  # $1: folder. The package as its import names lay it out, plus the tests.
  rm -rf "$1" && mkdir -p "$1"
  cp -r qwen_image_lora "$1/qwen_image_lora"
  for sub in train data inference eval; do cp -r "$sub" "$1/qwen_image_lora/$sub"; done
  cp -r tests "$1/tests"
  find "$1" -name __pycache__ -prune -exec rm -rf {} +
}

toml_list() { printf '"%s", ' "$@" | sed 's/, $//'; }

for name in "${ORDER[@]}"; do
  spec=${MODULES[$name]:-}
  [ -n "$spec" ] || { echo "unknown module $name; choose from: ${!MODULES[*]}" >&2; exit 2; }
  IFS='|' read -r source_file test_list globs deselect <<< "$spec"
  globs=${MUTATION_GLOBS:-$globs}
  tests=()
  for t in $test_list; do [ -f "$t" ] && tests+=("$t"); done
  [ ${#tests[@]} -gt 0 ] || { echo "$name: none of its tests exist ($test_list); skipped"; continue; }
  dir=build/mutation/$name${MUTATION_TAG:+-$MUTATION_TAG}  # a tag keeps a re-check apart from the full run
  stage "$dir"
  cat > "$dir/pyproject.toml" <<EOF
[tool.mutmut]
timeout_constant = $TIMEOUT_CONSTANT
source_paths = ["qwen_image_lora"]
only_mutate = ["$source_file"]
pytest_add_cli_args_test_selection = [$(toml_list "${tests[@]}")]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore"$([ -n "$deselect" ] && printf ', "-k", "%s"' "$deselect")]

[tool.pytest.ini_options]
filterwarnings = ["ignore::DeprecationWarning", "ignore::FutureWarning"]
EOF
  echo "== $name: $source_file against ${tests[*]}"
  (cd "$dir" && timeout "$TIMEOUT" nice -n 10 "$MUTMUT" run --max-children "$CHILDREN" $globs > run.log 2>&1) \
    || echo "   (mutmut stopped early, rc=$?; the score counts the mutants it reached; see $dir/run.log)"
  (cd "$dir" && "$MUTMUT" results --all true > results.txt 2>&1 || true)
  # A mutant no test reaches counts against the score, like one that survives.
  # Mutants outside the globs stay "not checked" and are not counted.
  grep -E ": (survived|no tests)$" "$dir/results.txt" | sed 's/^ *//' > "$dir/survivors.txt" || true
  # A timeout may be an equivalent mutant that ran slowly on a busy machine: reported apart, not scored as a kill.
  killed=$(grep -cE ": (killed|segfault)$" "$dir/results.txt" || true)
  timeouts=$(grep -cE ": timeout$" "$dir/results.txt" || true)
  survived=$(wc -l < "$dir/survivors.txt")
  total=$((killed + survived))
  score=$([ "$total" -gt 0 ] && echo "scale=1; 100 * $killed / $total" | bc || echo "n/a")
  echo "$name $killed/$total decided mutants killed ($score%), $timeouts timeouts, survivors in $dir/survivors.txt"
done
