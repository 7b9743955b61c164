// Operator schemas of torch.ops.memtx_C and the Python module memtx_ops._C that loads them.
#include <torch/extension.h>

#include "common/rel_memory_attention.h"
#include "cpu/causal_resample.h"
#include "cpu/dropout.h"

TORCH_LIBRARY(memtx_C, m) {
  m.def(
      "rel_memory_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor r, Tensor u, Tensor vb, "
      "Tensor kv_head_index, int window, int mem_offset, float scale, bool float32_out=False) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "rel_memory_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor r, Tensor u, Tensor vb, "
      "Tensor out, Tensor lse, Tensor kv_head_index, int window, int mem_offset, float scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dr, Tensor du, Tensor dvb)");
  m.def("dropout(Tensor x, float p, Tensor seed) -> Tensor");
  m.def("relu_dropout(Tensor x, float p, Tensor seed) -> Tensor");
  m.def("relu_dropout_backward(Tensor grad, Tensor out, float p) -> Tensor");
  m.def("causal_downsample(Tensor x, Tensor? prev, Tensor? weights, int factor) -> Tensor");
  m.def("causal_downsample_backward(Tensor grad, Tensor? weights, int factor) -> (Tensor dx, Tensor dprev)");
  m.def("causal_downsample_weights_grad(Tensor grad, Tensor x, Tensor? prev, int factor) -> Tensor");
  m.def("upsample_add(Tensor x_short, Tensor residual, Tensor? prev, int factor, str mode) -> Tensor");
  m.def("upsample_add_backward(Tensor grad, int factor, str mode) -> (Tensor dx_short, Tensor dprev)");
}

TORCH_LIBRARY_IMPL(memtx_C, CPU, m) {
  m.impl("rel_memory_attention_fwd", &memtx::rel_memory_attention_fwd_cpu);
  m.impl("rel_memory_attention_bwd", &memtx::rel_memory_attention_bwd_cpu);
  m.impl("dropout", &memtx::dropout_cpu);
  m.impl("relu_dropout", &memtx::relu_dropout_cpu);
  m.impl("relu_dropout_backward", &memtx::relu_dropout_backward_cpu);
  m.impl("causal_downsample", &memtx::causal_downsample_cpu);
  m.impl("causal_downsample_backward", &memtx::causal_downsample_backward_cpu);
  m.impl("causal_downsample_weights_grad", &memtx::causal_downsample_weights_grad_cpu);
  m.impl("upsample_add", &memtx::upsample_add_cpu);
  m.impl("upsample_add_backward", &memtx::upsample_add_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "memtx_ops C++/CUDA kernels, exposed as torch.ops.memtx_C";
}
