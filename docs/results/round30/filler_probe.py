"""The demo's filler prompt (a note once, 20 repeated filler sentences, the question; all but the last token
compressed) at several budgets: how many of 8 notes each policy answers."""
import random, sys, torch
from kvp_gym import scorers
from kvp_gym.data.common import render_messages
from kvp_gym.eval.downstream import prefilled_cache
from kvp_gym.models import load_model
torch.set_num_threads(2)
model, tokenizer = load_model()
QUESTION = "What is the locker code, and when is the meeting?"
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
FILLER = "The weather was mild and the trains ran on time. " * 20
rng = random.Random(0)
codes = [("4821", "Thursday")] + [("".join(rng.choice("123456789") for _ in range(4)), rng.choice(DAYS)) for _ in range(7)]
def ids_of(code, day):
    text = render_messages(tokenizer, [{"role": "user", "content": f"Here is a note: the locker code is {code} and the meeting moved to {day}. {FILLER}{QUESTION}"}], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
prompts = [ids_of(c, d) for c, d in codes]
@torch.inference_mode()
def answer(ids, policy, budget):
    cache = prefilled_cache(model, ids[:, :-1], scorers.get(policy), budget, 4, 16)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
for budget in map(int, sys.argv[1].split(",")):
    for policy in sys.argv[2].split(","):
        right = sum(code in answer(ids, policy, budget) for ids, (code, _) in zip(prompts, codes))
        print(f"budget {budget} ({budget / (prompts[0].shape[1] - 1):.0%}): {policy:<26} {right}/8", flush=True)
