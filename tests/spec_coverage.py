"""Which test proves the effect of each spec field ("no field that parses but does nothing").

Every leaf of the spec (``llmtrain.api.support.spec_leaf_paths()``) is either here, mapped
to the test that fails when the field stops having its effect, or listed in
``llmtrain.api.support.NOT_SUPPORTED_YET`` (rejected by ``llmtrain validate``).
``tests/unit/test_spec_coverage.py`` enforces it.
"""

from __future__ import annotations

D = "tests/unit/test_data_prepare.py"
C = "tests/unit/test_data_collect.py"
CL = "tests/unit/test_data_clean.py"
T = "tests/unit/test_data_tokenize.py"
M = "tests/unit/test_model.py"
TR = "tests/unit/test_train.py"
OM = "tests/unit/test_operator_manifests.py"
OR = "tests/unit/test_operator_reconcile.py"
X = "tests/unit/test_export.py"
OS = "tests/unit/test_operator_serve.py"
VS = "test_validation_sources_are_the_validation_set_and_never_trained_on"
TU = "tests/unit/test_tune.py"
TG = "tests/integration/test_tune_run.py"
TS = "tests/integration/test_data_task_s3.py"
TS3 = "test_prompt_response_and_chat_records_through_s3_and_huggingface"

EFFECTS: dict[str, str] = {
    # ---- data
    "spec.data.sources[].name": f"{D}::test_mixture_weights_realised_within_two_percent",
    "spec.data.sources[].weight": f"{D}::test_mixture_weights_realised_within_two_percent",
    "spec.data.sources[].s3.uri": "tests/integration/test_data_s3.py::test_austen_and_records_round_trip_through_s3",
    "spec.data.sources[].s3.format": "tests/integration/test_data_s3.py::test_austen_and_records_round_trip_through_s3",
    "spec.data.sources[].s3.field": "tests/integration/test_data_s3.py::test_austen_and_records_round_trip_through_s3",
    "spec.data.sources[].s3.textUnit": "tests/integration/test_data_s3.py::test_austen_and_records_round_trip_through_s3",
    "spec.data.sources[].local.glob": f"{C}::test_local_glob_and_keys_are_stable",
    "spec.data.sources[].local.format": f"{C}::test_jsonl_field_and_gzip",
    "spec.data.sources[].local.field": f"{C}::test_jsonl_field_and_gzip",
    "spec.data.sources[].local.textUnit": f"{C}::test_text_units",
    "spec.data.sources[].huggingface.builder": f"{C}::test_huggingface_local_files",
    "spec.data.sources[].huggingface.dataFiles": f"{C}::test_huggingface_local_files",
    "spec.data.sources[].huggingface.split": f"{C}::test_huggingface_local_files",
    "spec.data.sources[].huggingface.field": f"{C}::test_huggingface_local_files",
    "spec.data.sources[].pythonStdlib.includeTests": f"{C}::test_stdlib_include_tests",
    "spec.data.sources[].task.format": "tests/unit/test_data_task.py::test_bad_task_records_are_named_and_counted",
    "spec.data.sources[].task.promptField": f"{TS}::{TS3}",
    "spec.data.sources[].task.responseField": f"{TS}::{TS3}",
    "spec.data.sources[].task.messagesField": f"{TS}::{TS3}",
    "spec.data.sources[].task.system": f"{TS}::{TS3}",
    "spec.data.preprocessing.normalization": f"{CL}::test_normalization_forms",
    "spec.data.preprocessing.removeControlChars": f"{CL}::test_remove_control_chars",
    "spec.data.preprocessing.normalizeWhitespace": f"{CL}::test_normalize_whitespace",
    "spec.data.preprocessing.minChars": f"{D}::test_min_and_max_chars_drop_documents",
    "spec.data.preprocessing.maxChars": f"{D}::test_min_and_max_chars_drop_documents",
    "spec.data.preprocessing.dedup": f"{CL}::test_dedup_none_keeps_duplicates",
    "spec.data.tokenizer.train.vocabSize": f"{T}::test_vocab_size",
    "spec.data.tokenizer.train.specialTokens": f"{T}::test_special_tokens_first_is_eot",
    "spec.data.tokenizer.train.minFrequency": f"{T}::test_min_frequency_limits_merges",
    "spec.data.tokenizer.train.sampleBytes": f"{T}::test_sample_bytes_bounds_the_training_sample",
    "spec.data.tokenizer.load.uri": f"{D}::test_load_tokenizer",
    "spec.data.tokenizer.load.endOfText": f"{T}::test_load_tokenizer_and_end_of_text",
    "spec.data.tokenizer.chatTemplate": "tests/unit/test_chat.py::test_spec_chat_template_is_resolved_first",
    "spec.data.outputUri": f"{D}::test_reuse_mismatch_and_overwrite",
    "spec.data.validationFraction": f"{D}::test_validation_fraction_and_seed",
    "spec.data.shardMaxTokens": f"{D}::test_shard_max_tokens",
    "spec.data.seed": f"{D}::test_validation_fraction_and_seed",
    "spec.data.validationSources[].name": f"{D}::{VS}",
    "spec.data.validationSources[].weight": "tests/unit/test_validate.py::test_every_cel_rule_has_its_own_invalid_case",
    # ---- model
    "spec.model.architecture.layers": f"{M}::test_architecture_shape_fields",
    "spec.model.architecture.dModel": f"{M}::test_architecture_shape_fields",
    "spec.model.architecture.heads": f"{M}::test_architecture_shape_fields",
    "spec.model.architecture.kvHeads": f"{M}::test_gqa_matches_repeated_kv_heads",
    "spec.model.architecture.contextLength": f"{M}::test_architecture_shape_fields",
    "spec.model.architecture.ropeTheta": f"{M}::test_rope_theta_and_norm_eps_change_logits",
    "spec.model.architecture.normEps": f"{M}::test_rope_theta_and_norm_eps_change_logits",
    "spec.model.architecture.dropout": f"{M}::test_dropout_active_only_in_training",
    "spec.model.architecture.tieEmbeddings": f"{M}::test_tie_embeddings_shares_the_table",
    "spec.model.architecture.ffnHiddenSize": f"{M}::test_architecture_shape_fields",
    "spec.model.architecture.multipleOf": f"{M}::test_architecture_shape_fields",
    "spec.model.architecture.ffnDimMultiplier": f"{M}::test_architecture_shape_fields",
    "spec.model.architecture.vocabMultipleOf": f"{M}::test_architecture_shape_fields",
    "spec.model.init.random.seed": f"{M}::test_init_seed_and_std",
    "spec.model.init.random.std": f"{M}::test_init_seed_and_std",
    "spec.model.init.checkpoint.uri": "tests/integration/test_finetune.py::test_fsdp_ranks_load_pretrained_and_checkpoint_init_and_export_two_rank_checkpoints",
    "spec.model.init.pretrained.uri": "tests/integration/test_finetune.py::test_train_loop_applies_spec_model_init",
    # ---- training
    "spec.training.optimizer.type": f"{TR}::test_adamw_betas_eps_and_sgd_momentum_nesterov",
    "spec.training.optimizer.lr": f"{TR}::test_schedule_spec_fields_drive_the_loop_lr",
    "spec.training.optimizer.weightDecay": f"{TR}::test_weight_decay_applies_to_2d_weights_only",
    "spec.training.optimizer.beta1": f"{TR}::test_adamw_betas_eps_and_sgd_momentum_nesterov",
    "spec.training.optimizer.beta2": f"{TR}::test_adamw_betas_eps_and_sgd_momentum_nesterov",
    "spec.training.optimizer.eps": f"{TR}::test_adamw_betas_eps_and_sgd_momentum_nesterov",
    "spec.training.optimizer.momentum": f"{TR}::test_adamw_betas_eps_and_sgd_momentum_nesterov",
    "spec.training.optimizer.nesterov": f"{TR}::test_adamw_betas_eps_and_sgd_momentum_nesterov",
    "spec.training.schedule.warmupSteps": f"{TR}::test_schedule_spec_fields_drive_the_loop_lr",
    "spec.training.schedule.decay": f"{TR}::test_lr_schedule_warmup_then_decay",
    "spec.training.schedule.minLr": f"{TR}::test_schedule_spec_fields_drive_the_loop_lr",
    "spec.training.batch.globalBatchSize": f"{TR}::test_batch_sizes_set_accumulation_and_tokens",
    "spec.training.batch.microBatchSize": f"{TR}::test_batch_sizes_set_accumulation_and_tokens",
    "spec.training.duration.epochs": f"{TR}::test_duration_epochs_steps_tokens",
    "spec.training.duration.maxSteps": f"{TR}::test_duration_epochs_steps_tokens",
    "spec.training.duration.maxTokens": f"{TR}::test_duration_epochs_steps_tokens",
    "spec.training.precision": f"{TR}::test_precision_bf16_autocast_and_auto_is_fp32_on_cpu",
    "spec.training.fsdp.reshardAfterForward": "tests/integration/test_train_distributed.py::test_reshard_after_forward",
    "spec.training.fsdp.activationCheckpointing": f"{TR}::test_activation_checkpointing_and_compile_reach_the_model",
    "spec.training.compile": f"{TR}::test_activation_checkpointing_and_compile_reach_the_model",
    "spec.training.gradClip": f"{TR}::test_grad_clip_bounds_the_global_norm",
    "spec.training.seed": f"{TR}::test_seed_sets_data_order_and_dropout",
    "spec.training.logEverySteps": f"{TR}::test_log_every_steps_and_progress_events",
    "spec.validation.everySteps": f"{TR}::test_validation_every_steps_and_batches",
    "spec.validation.batches": f"{TR}::test_validation_every_steps_and_batches",
    "spec.validation.task.records": "tests/unit/test_task_metric.py::test_task_score_reads_records_tokenizer_and_template_beside_the_shards",
    "spec.validation.task.maxNewTokens": "tests/unit/test_task_metric.py::test_answers_equal_an_independent_greedy_loop_and_counts_match",
    "spec.validation.task.checker": "tests/unit/test_task_metric.py::test_answers_equal_an_independent_greedy_loop_and_counts_match",
    "spec.checkpoint.uri": f"{TR}::test_checkpoint_every_steps_keep_last_and_resume",
    "spec.checkpoint.everySteps": f"{TR}::test_checkpoint_every_steps_keep_last_and_resume",
    "spec.checkpoint.keepLast": f"{TR}::test_checkpoint_every_steps_keep_last_and_resume",
    "spec.checkpoint.takeOver": "tests/integration/test_output_prefix_owner.py::test_two_jobs_on_one_prefix",
    "spec.checkpoint.onDisruption": "tests/integration/test_operator_drain.py::test_drain_takes_a_jit_checkpoint_and_resumes_from_it",
    "spec.export.uri": "tests/integration/test_finetune.py::test_spec_export_writes_the_run_model_to_s3",
    "spec.export.format": f"{X}::test_export_refuses_wrong_shapes_format_and_untied_weights",
    "spec.export.samplePrompt": f"{D}::test_the_default_sample_prompt_is_the_start_of_a_validation_document",
    "spec.export.lora": "tests/unit/test_lora.py::test_spec_export_lora_picks_adapter_or_merged",
    "spec.training.lora.rank": "tests/unit/test_lora.py::test_trainable_params_are_the_adapters_by_the_formula",
    "spec.training.lora.targets": "tests/unit/test_lora.py::test_trainable_params_are_the_adapters_by_the_formula",
    "spec.training.lora.alpha": "tests/unit/test_lora.py::test_lora_linear_is_the_base_plus_the_scaled_low_rank_update",
    "spec.training.lora.dropout": "tests/unit/test_lora.py::test_lora_checkpoint_is_small_and_resumes_exactly",
    # ---- storage and metrics
    "spec.storage.endpoint": "tests/integration/test_data_s3.py::test_storage_region_and_endpoint_come_from_the_spec",
    "spec.storage.region": "tests/integration/test_data_s3.py::test_storage_region_and_endpoint_come_from_the_spec",
    "spec.storage.secretRef.name": f"{OM}::test_storage_secret_ref_becomes_aws_env",
    "spec.storage.secretRef.accessKeyIdKey": f"{OM}::test_storage_secret_ref_becomes_aws_env",
    "spec.storage.secretRef.secretAccessKeyKey": f"{OM}::test_storage_secret_ref_becomes_aws_env",
    "spec.metrics.enabled": f"{TR}::test_metrics_served_on_the_spec_port",
    "spec.metrics.port": f"{TR}::test_metrics_served_on_the_spec_port",
    # ---- resources (pod manifests)
    "spec.resources.workers": f"{OM}::test_resources_workers",
    "spec.resources.gpusPerWorker": f"{OM}::test_resources_gpus_per_worker_requests_equal_limits",
    "spec.resources.worker.cpu": f"{OM}::test_resources_worker_cpu_memory",
    "spec.resources.worker.memory": f"{OM}::test_resources_worker_cpu_memory",
    "spec.resources.head.cpu": f"{OM}::test_resources_head_cpu_memory",
    "spec.resources.head.memory": f"{OM}::test_resources_head_cpu_memory",
    "spec.resources.image": f"{OM}::test_resources_image",
    "spec.resources.imagePullSecrets[].name": f"{OM}::test_resources_image_pull_secrets",
    "spec.resources.serviceAccountName": f"{OM}::test_resources_service_account_name",
    "spec.resources.env[].name": f"{OM}::test_resources_env",
    "spec.resources.env[].value": f"{OM}::test_resources_env",
    "spec.resources.env[].valueFrom.secretKeyRef.name": f"{OM}::test_resources_env",
    "spec.resources.env[].valueFrom.secretKeyRef.key": f"{OM}::test_resources_env",
    "spec.resources.env[].valueFrom.configMapKeyRef.name": f"{OM}::test_resources_env",
    "spec.resources.env[].valueFrom.configMapKeyRef.key": f"{OM}::test_resources_env",
    "spec.resources.volumes": f"{OM}::test_resources_volumes_and_volume_mounts",
    "spec.resources.volumeMounts[].name": f"{OM}::test_resources_volumes_and_volume_mounts",
    "spec.resources.volumeMounts[].mountPath": f"{OM}::test_resources_volumes_and_volume_mounts",
    "spec.resources.volumeMounts[].readOnly": f"{OM}::test_resources_volumes_and_volume_mounts",
    "spec.resources.volumeMounts[].subPath": f"{OM}::test_resources_volumes_and_volume_mounts",
    "spec.resources.podLabels": f"{OM}::test_resources_pod_labels",
    "spec.resources.podAnnotations": f"{OM}::test_resources_pod_annotations",
    "spec.resources.shmSize": f"{OM}::test_resources_shm_size",
    "spec.resources.nodeSelector": f"{OM}::test_resources_node_selector_on_workers_only",
    "spec.resources.tolerations[].key": f"{OM}::test_resources_tolerations",
    "spec.resources.tolerations[].operator": f"{OM}::test_resources_tolerations",
    "spec.resources.tolerations[].value": f"{OM}::test_resources_tolerations",
    "spec.resources.tolerations[].effect": f"{OM}::test_resources_tolerations",
    "spec.resources.tolerations[].tolerationSeconds": f"{OM}::test_resources_tolerations",
    "spec.resources.affinity": f"{OM}::test_resources_affinity",
    "spec.resources.priorityClassName": f"{OM}::test_resources_priority_class_name",
    "spec.resources.queueName": "tests/unit/test_operator_kueue.py::test_queued_job_makes_no_pod_and_says_what_kueue_says",
    # ---- lifecycle
    "spec.suspend": f"{OR}::test_suspend_deletes_pods_keeps_status_and_resume_recreates",
    "spec.backoffLimit": f"{OR}::test_failed_pod_restarts_the_cluster_then_backoff_limit_fails_the_job",
    "spec.activeDeadlineSeconds": f"{OR}::test_active_deadline",
    "spec.preRunningDeadlineSeconds": f"{OR}::test_pre_running_deadline_fails_with_the_diagnosis",
    "spec.ttlSecondsAfterFinished": f"{OR}::test_ttl_after_finished_deletes_the_ray_cluster_and_keeps_the_job",
    # ---- serve
    "spec.serve.replicas": f"{OS}::test_editing_spec_serve_patches_the_server_and_unsetting_it_removes_it",
    "spec.serve.port": f"{OS}::test_editing_spec_serve_patches_the_server_and_unsetting_it_removes_it",
    "spec.serve.resources.cpu": f"{OS}::test_server_pods_default_to_the_training_pool_and_are_not_ray_pods",
    "spec.serve.resources.memory": f"{OS}::test_server_pods_default_to_the_training_pool_and_are_not_ray_pods",
    "spec.serve.gpus": f"{OS}::test_server_pods_default_to_the_training_pool_and_are_not_ray_pods",
    "spec.serve.nodeSelector": f"{OS}::test_server_pods_default_to_the_training_pool_and_are_not_ray_pods",
    **{
        f"spec.serve.tolerations[].{k}": f"{OS}::test_server_pods_default_to_the_training_pool_and_are_not_ray_pods"
        for k in ("key", "operator", "value", "effect", "tolerationSeconds")
    },
    "spec.serve.allowedNamespaces": f"{OS}::test_the_servers_network_policy_admits_exactly_the_named_clients",
    "spec.serve.allowedPods": f"{OS}::test_the_servers_network_policy_admits_exactly_the_named_clients",
    "spec.serve.apiKeySecretRef.name": f"{OS}::test_the_api_key_is_a_read_only_file_the_server_is_pointed_at",
    "spec.serve.apiKeySecretRef.key": f"{OS}::test_the_api_key_is_a_read_only_file_the_server_is_pointed_at",
    "spec.serve.maxWaiting": f"{OS}::test_the_api_key_is_a_read_only_file_the_server_is_pointed_at",
    **{
        f"spec.serve.storageSecretRef.{k}": (
            f"{OS}::test_the_server_gets_spec_serve_storage_secret_ref_instead_of_the_jobs_credentials"
        )
        for k in ("name", "accessKeyIdKey", "secretAccessKeyKey")
    },
    # ---- tuning
    **{
        f"spec.tuning.{k}": f"{TG}::test_grid_runs_its_grid_asha_frees_workers_and_the_best_is_trained_and_exported"
        for k in (
            "search",
            "trialBudget.maxSteps",
            "earlyStopping.gracePeriodSteps",
            "earlyStopping.reductionFactor",
            "space",
        )
    },
    **{
        f"spec.tuning.{k}": f"{TG}::test_bayesian_runs_num_trials_concurrently_and_exports_the_best_trials_checkpoint"
        for k in ("metric", "mode", "numTrials", "maxConcurrentTrials", "final.train")
    },
    "spec.tuning.initialRandomTrials": f"{TU}::test_random_and_bayesian_samplers_are_seeded_and_startup_trials_are_passed",
    "spec.tuning.seed": f"{TU}::test_random_and_bayesian_samplers_are_seeded_and_startup_trials_are_passed",
    "spec.tuning.workersPerTrial": f"{TU}::test_a_trial_trains_its_configuration_for_the_budget_on_its_workers",
    "spec.tuning.trialBudget.maxTokens": f"{TU}::test_a_trial_trains_its_configuration_for_the_budget_on_its_workers",
}
# A validation source is read by the same code as a training source (collect.SourceConfig):
# each kind's fields have the effect their spec.data.sources[] twin's test proves.
EFFECTS.update(
    {
        k.replace("spec.data.sources[]", "spec.data.validationSources[]"): v
        for k, v in list(EFFECTS.items())
        if k.startswith("spec.data.sources[].")
        and k not in ("spec.data.sources[].name", "spec.data.sources[].weight")
    }
)
