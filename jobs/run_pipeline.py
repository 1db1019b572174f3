"""`ray job submit` entrypoint: the whole pipeline (annotate -> train-bert -> classify -> evaluate).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run_pipeline.py --config configs/imdb_llama2-7b_qlora_cluster.yaml [--set key=value ...]

Outputs go to <run.output_dir>/<run.name> (use an s3:// or gs:// output_dir on a multi-node
cluster). Same arguments as `lambert-ray run`.
"""

from _entry import main

if __name__ == "__main__":
    main("run")
