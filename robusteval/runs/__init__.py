"""Run directories: the files of a run (`directory`), its one-writer lock (`lock`) and its shards (`shards`)."""

from robusteval.runs.directory import (
    CONFIG_FILE,
    PROVENANCE_KEY,
    SAMPLES_FILE,
    SUMMARY_FILE,
    RunConfigMismatch,
    RunDirectory,
    RunFileDamaged,
    RunRecordsInvalid,
    config_id,
    default_run_dir,
    read_json_file,
    read_run,
)

__all__ = [
    "CONFIG_FILE", "PROVENANCE_KEY", "SAMPLES_FILE", "SUMMARY_FILE", "RunConfigMismatch", "RunDirectory",
    "RunFileDamaged", "RunRecordsInvalid", "config_id", "default_run_dir", "read_json_file", "read_run",
]
