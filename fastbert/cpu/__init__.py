"""The CPU backend: what this CPU can do (`machine`: one record, and the choices made from it; `info`: the
CPU's name and features) and the CPU code fastbert runs besides the per-op kernels in fastbert.ops.extension:
the packed oneDNN GEMM (`onednn_linear`, bf16 on row blocks: `onednn_row_blocks`), fastbert's GEMMs for few
rows (`few_rows_linear`, csrc/cpu/gemm/), their packed-weight cache (`weight_cache`), int8 (`int8_linear`) and
the attention kernel (`attention`, csrc/cpu/attention.cpp). Imported on first use: `import fastbert` reads no
CPU facts and loads no extension."""
