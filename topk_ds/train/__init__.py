"""Training on DeepSpeed: `deepspeed --num_gpus 8 --module topk_ds.train --config CONFIG`, or
`topk-ds train --config CONFIG` for one process. engine.py is the only module that imports DeepSpeed."""
