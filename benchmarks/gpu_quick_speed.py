import time, sys, json, torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, StaticCache
from modeling_muddpythia import muddify

def timeit(fn, reps=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts=[]
    for _ in range(reps):
        t=time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]

def compiled_decode(m, prompt, n=128):
    cache = StaticCache(config=m.config, max_cache_len=prompt.shape[1] + n + 8)
    fwd = torch.compile(m.forward, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        tok = m(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        pos = prompt.shape[1]
        for i in range(n):
            if i == 8: torch.cuda.synchronize(); t = time.perf_counter()
            tok = fwd(tok, past_key_values=cache, position_ids=torch.tensor([[pos]], device="cuda"), use_cache=True).logits[:, -1:].argmax(-1)
            pos += 1
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / (n - 8)

res={}
which = sys.argv[1:] or ["1.4b"]
shapes = {"1.4b": (24, 2048, 16), "2.8b": (32, 2560, 32)}
for name in which:
    L, D, H = shapes[name]
    cfg = GPTNeoXConfig(vocab_size=50432, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4*D, max_position_embeddings=2048, rotary_pct=0.25)
    torch.manual_seed(0)
    plain = GPTNeoXForCausalLM(cfg).to(torch.bfloat16).cuda()
    plain.config._attn_implementation = "sdpa"
    mudd = muddify(plain)
    with torch.no_grad():
        for l in mudd.model.dense.layers: l.proj_out.weight.normal_(0, 0.02)
    ids = torch.randint(0, 50432, (4, 2048), device="cuda")
    for tag, m in (("plain", plain), ("mudd", mudd)):
        m.eval()
        with torch.no_grad():
            res[f"{name}_{tag}_fwd"] = timeit(lambda: m(ids, logits_to_keep=1))
        m.train()
        def step():
            loss = m(ids, labels=ids).loss; loss.backward()
            for p in m.parameters(): p.grad = None
        res[f"{name}_{tag}_train"] = timeit(step, reps=5)
        torch.cuda.reset_peak_memory_stats(); step(); torch.cuda.synchronize()
        res[f"{name}_{tag}_peakmem_GB"] = torch.cuda.max_memory_allocated()/1e9
        m.eval()
        prompt = ids[:1, :128]
        def dec(): m.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
        res[f"{name}_{tag}_generate_s_per64"] = timeit(dec, reps=3)
        try:
            res[f"{name}_{tag}_compiled_decode_s_per_token"] = compiled_decode(m, prompt)
        except Exception as e:
            print("compiled decode failed", tag, type(e).__name__, str(e)[:300])
    for k in ("fwd", "train", "peakmem_GB", "generate_s_per64", "compiled_decode_s_per_token"):
        if f"{name}_mudd_{k}" in res:
            res[f"{name}_ratio_{k}"] = res[f"{name}_mudd_{k}"]/res[f"{name}_plain_{k}"]
    del plain, mudd; torch.cuda.empty_cache()
print(json.dumps(res, indent=1))
