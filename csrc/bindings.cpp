// gemforge's pybind11 modules, from this one file: gemforge.kernels._C holds the CPU kernels of cpu/ops.h as
// _C.cpu (always built) and, when built with nvcc (GEMFORGE_WITH_CUDA), the CUDA launch functions of ops.h;
// gemforge.kernels._C_emu (GEMFORGE_EMULATED) holds the same CUDA launch functions built for the emulated
// device of csrc/emu/, taking host pointers. Nothing here touches CUDA at import time.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#ifndef GEMFORGE_EMULATED
#include "cpu/ops.h"
#endif
#ifdef GEMFORGE_WITH_CUDA
#include "ops.h"
#endif

namespace py = pybind11;

#ifndef GEMFORGE_EMULATED

static void bind_cpu(py::module_& m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "gemforge CPU kernels; host pointers are passed as integers (see csrc/cpu/ops.h)";
  m.def("rms_norm", &gf::cpu::rms_norm, nogil(), py::arg("y"), py::arg("r_out"), py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("rows"), py::arg("hidden"), py::arg("x_stride"), py::arg("res_stride"),
        py::arg("eps"), py::arg("dtype"));
  m.def("gelu_and_mul", &gf::cpu::gelu_and_mul, nogil(), py::arg("out"), py::arg("gate_up"), py::arg("rows"),
        py::arg("n"), py::arg("dtype"));
  m.def("rotary", &gf::cpu::rotary, nogil(), py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("inv_freq"),
        py::arg("tokens"), py::arg("hq"), py::arg("hk"), py::arg("head_dim"), py::arg("q_stride"),
        py::arg("k_stride"), py::arg("dtype"));
  m.def("write_kv", &gf::cpu::write_kv, nogil(), py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slots"), py::arg("tokens"), py::arg("row_elems"), py::arg("k_stride"), py::arg("v_stride"),
        py::arg("elem_size"), py::arg("num_slots"));
  m.def("paged_attention", &gf::cpu::paged_attention, nogil(), py::arg("out"), py::arg("q"), py::arg("tokens"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("cu_seqlens_q"), py::arg("context_lens"), py::arg("block_tables"),
        py::arg("num_seqs"), py::arg("q_stride"), py::arg("bt_stride"), py::arg("bt_width"), py::arg("hq"),
        py::arg("hk"), py::arg("head_dim"), py::arg("block_size"), py::arg("num_blocks"), py::arg("scale"), py::arg("dtype"));
  m.def("linear_packed_bf16", &gf::cpu::linear_packed_bf16, nogil(), py::arg("y"), py::arg("x"), py::arg("wp"),
        py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("linear_packed_geglu_bf16", &gf::cpu::linear_packed_geglu_bf16, nogil(), py::arg("y"), py::arg("x"),
        py::arg("wp"), py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("embed_packed_bf16", &gf::cpu::embed_packed_bf16, nogil(), py::arg("out"), py::arg("table"), py::arg("ids"),
        py::arg("tokens"), py::arg("N"), py::arg("K"), py::arg("scale"));
  m.def("decoder_layers", &gf::cpu::decoder_layers, nogil(), py::arg("h"), py::arg("residual"), py::arg("scratch"),
        py::arg("tokens"), py::arg("weights"), py::arg("k_caches"), py::arg("v_caches"), py::arg("positions"),
        py::arg("inv_freq"), py::arg("slots"), py::arg("cu_seqlens_q"), py::arg("context_lens"),
        py::arg("block_tables"), py::arg("num_seqs"), py::arg("bt_stride"), py::arg("bt_width"), py::arg("num_blocks"),
        py::arg("block_size"), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
        py::arg("inter"), py::arg("eps"), py::arg("scale"));
  m.def("decoder_logits", &gf::cpu::decoder_logits, nogil(), py::arg("logits"), py::arg("h"), py::arg("residual"),
        py::arg("tokens"), py::arg("rows"), py::arg("n_rows"), py::arg("norm"), py::arg("table"), py::arg("scratch"), py::arg("hidden"),
        py::arg("vocab"), py::arg("eps"));
  m.def("argmax", &gf::cpu::argmax, nogil(), py::arg("out"), py::arg("x"), py::arg("rows"), py::arg("n"),
        py::arg("stride"));
  m.def("linear_int8_bf16", &gf::cpu::linear_int8_bf16, nogil(), py::arg("y"), py::arg("x"), py::arg("qweight"),
        py::arg("scales"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("linear_int4_bf16", &gf::cpu::linear_int4_bf16, nogil(), py::arg("y"), py::arg("x"), py::arg("qweight"),
        py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("group"));
  m.attr("HAS_BF16_DOT") = gf::cpu::has_bf16_dot();
}

static void set_dtype_codes(py::module_& m) {
  m.attr("DTYPE_FLOAT32") = static_cast<int>(0);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(1);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(2);
}
#endif  // !GEMFORGE_EMULATED

#ifdef GEMFORGE_WITH_CUDA
static void bind_cuda(py::module_& m) {
  m.def("set_programmatic_launch", &gf::set_programmatic_launch, py::arg("on"));
  m.def("programmatic_launch", &gf::programmatic_launch);  // (whether launches now are: on and sm_90+)
  m.def("rms_norm", &gf::rms_norm, py::arg("y"), py::arg("r_out"), py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("rows"), py::arg("hidden"), py::arg("x_stride"), py::arg("res_stride"),
        py::arg("eps"), py::arg("dtype"), py::arg("stream"));
  m.def("gelu_and_mul", &gf::gelu_and_mul, py::arg("out"), py::arg("gate_up"), py::arg("rows"), py::arg("n"),
        py::arg("dtype"), py::arg("stream"));
  m.def("rotary", &gf::rotary, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("inv_freq"),
        py::arg("tokens"), py::arg("hq"), py::arg("hk"), py::arg("head_dim"), py::arg("q_stride"),
        py::arg("k_stride"), py::arg("dtype"), py::arg("stream"));
  m.def("write_kv", &gf::write_kv, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slots"), py::arg("tokens"), py::arg("row_elems"), py::arg("k_stride"), py::arg("v_stride"),
        py::arg("elem_size"), py::arg("stream"));
  m.def("decode_partition_size", &gf::decode_partition_size, py::arg("hq"), py::arg("hk"), py::arg("head_dim"));
  m.def("decode_attention", &gf::decode_attention, py::arg("out"), py::arg("part_acc"), py::arg("part_max"),
        py::arg("part_sum"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cu_seqlens_q"),
        py::arg("context_lens"), py::arg("block_tables"), py::arg("num_seqs"), py::arg("q_stride"),
        py::arg("bt_stride"), py::arg("hq"), py::arg("hk"), py::arg("head_dim"), py::arg("block_size"),
        py::arg("max_parts"), py::arg("scale"), py::arg("tensor_cores"), py::arg("dtype"), py::arg("stream"));
  // (geglu, norm_weight, residual, r_out, eps, rope): what every linear below makes besides x W^T (ops.h)
#define GF_FUSION_ARGS py::arg("geglu"), py::arg("norm_weight"), py::arg("residual"), py::arg("r_out"), \
    py::arg("eps"), py::arg("rope")
  m.def("w8a16_gemm", &gf::w8a16_gemm, py::arg("y"), py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("max_ctas"), py::arg("prefetch"),
        GF_FUSION_ARGS, py::arg("dtype"), py::arg("stream"));
  m.def("w4a16_gemm", &gf::w4a16_gemm, py::arg("y"), py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"),
        py::arg("max_ctas"), py::arg("prefetch"), GF_FUSION_ARGS, py::arg("dtype"), py::arg("stream"));
  m.def("w4a16_mma", &gf::w4a16_mma, py::arg("y"), py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"),
        py::arg("k_split"), GF_FUSION_ARGS, py::arg("dtype"), py::arg("stream"));
  m.def("w8a16_mma", &gf::w8a16_mma, py::arg("y"), py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("k_split"), GF_FUSION_ARGS,
        py::arg("dtype"), py::arg("stream"));
  m.def("dense_mma", &gf::dense_mma, py::arg("y"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("k_split"), GF_FUSION_ARGS, py::arg("dtype"), py::arg("stream"));
  m.def("dense_gemv", &gf::dense_gemv, py::arg("y"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("max_ctas"), py::arg("prefetch"), GF_FUSION_ARGS, py::arg("dtype"),
        py::arg("stream"));
#undef GF_FUSION_ARGS
}
#endif

#ifdef GEMFORGE_EMULATED
PYBIND11_MODULE(_C_emu, m) {
  m.doc() = "gemforge's CUDA launch functions on the emulated device of csrc/emu/ (host pointers, stream ignored)";
  m.attr("WITH_CUDA") = true;
  bind_cuda(m);
}
#else
PYBIND11_MODULE(_C, m) {
  m.doc() = "gemforge native kernels; pointers and streams are passed as integers (see csrc/ops.h, csrc/cpu/ops.h)";
  set_dtype_codes(m);
  auto cpu = m.def_submodule("cpu");
  bind_cpu(cpu);
#ifdef GEMFORGE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  bind_cuda(m);
#else
  m.attr("WITH_CUDA") = false;
#endif
}
#endif
