# Sourced by scripts/gpu_run.sh and scripts/gpu_lease.sh (needs $PY): the CUDA build's toolchain, as
# scripts/build_cuda_ext.sh sets it. CUDA_HOME from nvcc itself (the nvcc on PATH may be a wrapper, which defeats
# torch's guess), and the cuBLAS/cuSPARSE headers of torch's nvidia wheels on CPATH when the toolkit lacks them.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  probe="$(mktemp -d)"; : > "$probe/x.cu"
  top="$(cd "$probe" && nvcc --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  rm -rf "$probe"
  [ -n "$top" ] && [ -d "$top" ] && export CUDA_HOME="$(cd "$top" && pwd -P)"
fi
NV_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/nvidia/cu13/include"
[ -d "$NV_INC" ] && export CPATH="$NV_INC${CPATH:+:$CPATH}"
