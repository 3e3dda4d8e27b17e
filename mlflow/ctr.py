"""MLflow Project entry points train, compare, promote and abtest: the same commands `llmfeat` runs
(train-ctr, compare, promote, abtest). Under `mlflow run` the run it opened becomes the command's run."""

import sys

from entry import project_argv

if __name__ == "__main__":
    argv = project_argv(sys.argv[1:])
    from llmfeat.cli import main

    sys.exit(main(argv))
