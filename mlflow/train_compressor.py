"""MLflow Project entry point `train_compressor`: the same job as `llmfeat train-compressor`."""

import sys

from entry import project_argv

if __name__ == "__main__":
    argv = project_argv(sys.argv[1:])
    from llmfeat.spark_jobs.train_compressor import main

    sys.exit(main(argv))
