// Operator schemas of torch.ops.memtx_C and the Python module memtx_ops._C that loads them.
#include <torch/extension.h>

#include "common/rel_memory_attention.h"
#include "cpu/dropout.h"

TORCH_LIBRARY(memtx_C, m) {
  m.def(
      "rel_memory_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor r, Tensor u, Tensor vb, "
      "Tensor kv_head_index, int window, int mem_offset, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "rel_memory_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor r, Tensor u, Tensor vb, "
      "Tensor out, Tensor lse, Tensor kv_head_index, int window, int mem_offset, float scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dr, Tensor du, Tensor dvb)");
  m.def("dropout(Tensor x, float p, Tensor seed) -> Tensor");
  m.def("relu_dropout(Tensor x, float p, Tensor seed) -> Tensor");
  m.def("relu_dropout_backward(Tensor grad, Tensor out, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(memtx_C, CPU, m) {
  m.impl("rel_memory_attention_fwd", &memtx::rel_memory_attention_fwd_cpu);
  m.impl("rel_memory_attention_bwd", &memtx::rel_memory_attention_bwd_cpu);
  m.impl("dropout", &memtx::dropout_cpu);
  m.impl("relu_dropout", &memtx::relu_dropout_cpu);
  m.impl("relu_dropout_backward", &memtx::relu_dropout_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "memtx_ops C++/CUDA kernels, exposed as torch.ops.memtx_C";
}
