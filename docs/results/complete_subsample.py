# one-off: score the documents NOT in a previous --subsample run, shard i of n (to complete a full-set number)
import sys, json, torch
torch.set_num_threads(1)
from pathlib import Path
from ligerfx.models import load_model
from ligerfx.evaluation import harness
from ligerfx.evaluation.tasks import prepare_tasks, default_data_dir
task, sub, shard, nshard, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
inc = prepare_tasks([task], default_data_dir())
done = set(harness.subsample_indices([task], inc, sub, 1234)[task])
total = len(open(json.loads((inc / "data_files.json").read_text())[task]).read().splitlines())
rest = [i for i in range(total) if i not in done][shard::nshard]
m, t = load_model("gemma-3-270m", dtype="bfloat16")
lm = harness.make_lm(m, t, batch_size=8, max_length=2048, softmax_dtype="float32")
r = harness.run_lm_eval(m, t, [task], lm=lm, samples={task: rest}, bootstrap_iters=0)
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps({"task": task, "docs": rest, "n": len(rest), "summary": harness.summarize(r),
                                 "environment": harness.environment()}, indent=1))
print(harness.summarize(r))
