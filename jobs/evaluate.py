"""`ray job submit` entrypoint: metrics against gold and the run report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/imdb_llama2-7b_qlora_cluster.yaml [--set key=value ...]

Outputs go to <run.output_dir>/<run.name> (use an s3:// or gs:// output_dir on a multi-node
cluster). Same arguments as `lambert-ray evaluate`.
"""

from _entry import main

if __name__ == "__main__":
    main("evaluate")
