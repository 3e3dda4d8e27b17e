"""MLflow Project entry points train_lite and distil_student: the same commands `llmfeat` runs (train-lite,
distil-student). Under `mlflow run` the run it opened holds the run (train-lite: one child run per model)."""

import sys

from entry import project_argv

if __name__ == "__main__":
    argv = project_argv(sys.argv[1:])
    from llmfeat.cli import main

    sys.exit(main(argv))
