"""LoRA term folded into the base GEMM by concatenation along K (``[x | xa | 0] @ [W | s B | 0]^T``, K padded by
16, 64 or 128) against the LoRA term first with the base GEMM adding into it (the default), and the copies the
concatenation needs; then the input gradient likewise along N (H200, Llama-3-8B shapes, T = 8192, r = 16).

    python benchmarks/bench_lora_kcat.py      (CUDA; medians of 20 CUDA-event timings after 3 warm-ups)
"""
import statistics, torch
def timed(fn, n=20):
    for _ in range(3): fn()
    ts=[]
    for _ in range(n):
        a,b=torch.cuda.Event(True),torch.cuda.Event(True); a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
T,r,s=8192,16,2.0
dev,dt="cuda",torch.bfloat16
g=torch.Generator(device=dev).manual_seed(0)
print(f"{'shape':22s} {'base':>7s} {'lorafirst':>9s} {'kcat4112':>8s} {'kcat4160':>8s} {'kcat4224':>8s} {'xcopy4160':>9s} {'W4160 fill':>10s}")
for name,K,N in (("q/o 4096->4096",4096,4096),("kv 4096->1024",4096,1024),("g/u 4096->14336",4096,14336),("g/u chunk ->7168",4096,7168),("down 14336->4096",14336,4096)):
    x=torch.randn(T,K,device=dev,dtype=dt,generator=g); W=torch.randn(N,K,device=dev,dtype=dt,generator=g)*0.02
    A=torch.randn(r,K,device=dev,dtype=dt,generator=g)*0.02; B=torch.randn(N,r,device=dev,dtype=dt,generator=g)*0.02
    xa=x@A.t()
    def lorafirst():
        y=torch.empty(T,N,device=dev,dtype=dt).addmm_(xa,B.t(),beta=0,alpha=s); return y.addmm_(x,W.t())
    res={}
    for KP in (K+16, K+64, K+128):
        xa_=torch.zeros(T,KP,device=dev,dtype=dt); xa_[:,:K]=x; xa_[:,K:K+r]=xa
        Wa=torch.zeros(N,KP,device=dev,dtype=dt); Wa[:,:K]=W; Wa[:,K:K+r]=B*s
        res[KP]=timed(lambda: xa_@Wa.t())
        if KP==K+64:
            ref=lorafirst().float(); got=(xa_@Wa.t()).float(); err=((got-ref).abs().max()/ref.abs().max()).item()
            xc=timed(lambda: xa_[:,:K].copy_(x)); wf=timed(lambda: Wa[:,:K].copy_(W))
    print(f"{name:22s} {timed(lambda: x@W.t()):7.3f} {timed(lorafirst):9.3f} {res[K+16]:8.3f} {res[K+64]:8.3f} {res[K+128]:8.3f} {xc:9.3f} {wf:10.3f}  err {err:.1e}")
    del x,W,xa
print(f"\n{'dx shape':22s} {'base':>7s} {'lorafirst':>9s} {'ncat+64':>8s}")
for name,K,N in (("q/o dx",4096,4096),("g/u chunk dx",4096,7168),("down dx (dm)",14336,4096)):
    dy=torch.randn(T,N,device=dev,dtype=dt,generator=g); W=torch.randn(N,K,device=dev,dtype=dt,generator=g)*0.02
    A=torch.randn(r,K,device=dev,dtype=dt,generator=g)*0.02; B=torch.randn(N,r,device=dev,dtype=dt,generator=g)*0.02
    dyB=dy@B
    def lorafirst():
        y=torch.empty(T,K,device=dev,dtype=dt).addmm_(dyB,A,beta=0,alpha=s); return y.addmm_(dy,W)
    dya=torch.zeros(T,N+64,device=dev,dtype=dt); dya[:,:N]=dy; dya[:,N:N+r]=dyB
    Wt=torch.zeros(N+64,K,device=dev,dtype=dt); Wt[:N]=W; Wt[N:N+r]=A*s
    print(f"{name:22s} {timed(lambda: dy@W):7.3f} {timed(lorafirst):9.3f} {timed(lambda: dya@Wt):8.3f}")
