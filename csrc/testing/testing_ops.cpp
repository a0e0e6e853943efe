// Test-only ops, in a namespace of their own (torch.ops.torchext_testing) and
// registered only when tests or benchmarks ask for them
// (torchext.testing.load_testing_ops(), through the C symbol below): user
// code never sees them in torch.ops.torchext.
#include "../aten/two_layer_square_aten.h"
#include "../build_flags.h"
#include "../buffers.h"
#include "../checks.h"
#include "../cpu/batch_plan_cpu.h"
#include "../cpu/head_products.h"
#include "../cuda/cuda_switches.h"
#include "../kernel_frames.h"
#include "../meta/two_layer_square_meta.h"
#include "../plan.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <memory>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

namespace torchext {
namespace {

// Which plan a call with these sizes runs (for the benchmark record and tests).
std::string plan_for_sizes(int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell,
                           c10::string_view plan, bool training) {
  check_plan_name(plan);
  return plan_name(resolve_plan(N, d, k, m, ell, plan, training));
}

// The CPU backend's split of a call with these sizes and plan (forced, or
// "auto" resolved): chunk rows, chunks, partitions.
std::vector<int64_t> cpu_split_for_sizes(int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell,
                                         c10::string_view plan, bool training) {
  check_plan_name(plan);
  const Dims dims{N, d, k, m, ell, {N}};
  const BatchPlan bp = cpu::cpu_batch_plan(dims, resolve_plan(dims, plan, training), training);
  return {bp.chunk_rows, bp.num_chunks, bp.partitions};
}

// The sample lets a test see that the switch took effect.
at::Tensor set_poison(bool enabled) {
  set_poisoning_uninitialized(enabled);
  return uninitialized({16}, at::TensorOptions().dtype(at::kFloat));
}

// Small chunks for the ATen twins, so CI runs the multi-chunk paths.
constexpr int64_t kTestChunkRows = 64;

void forward_aten_kernel(const Dims& dims, const ComputeInputs& in, Plan plan,
                         ForwardOutputs& out) {
  forward_aten(dims, in, plan, kTestChunkRows, out);
}

void backward_aten_kernel(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                          const at::Tensor& r, const at::Tensor& q, Plan plan,
                          const OutputMask& mask, GradBuffers& bufs) {
  backward_aten(dims, in, g, r, q, plan, mask, kTestChunkRows, bufs);
}

// The benchmark's node floor: the plain-eager route's autograd node
// (autograd/two_layer_square_autograd.cpp) with nothing inside. Called
// through torch.ops as the route is, it allocates f, r, q and a state and
// saves z, W, V, B, A, r, q and the state (r and q empty where keeps_saved
// says the route recomputes them), and returns zero-filled gradients for the
// inputs that need them; it makes no op calls of the route's own and no
// products.
struct NoOpNode : public torch::autograd::Function<NoOpNode> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& V, const at::Tensor& B,
                            const at::Tensor& A, c10::string_view /*plan*/) {
    TORCH_CHECK_VALUE(z.dim() >= 1 && W.dim() == 2,
                      "_noop_node: z must have at least 1 dimension and W 2; got z of shape ",
                      shape_str(z.sym_sizes()), " and W of shape ", shape_str(W.sym_sizes()));
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto rows = z.sizes().slice(0, z.dim() - 1);
    const int64_t d = z.size(-1), k = W.size(0);
    const bool saved = keeps_saved(d, k);
    const int64_t saved_rows = saved ? c10::multiply_integers(rows) : 0;
    at::Tensor f = at::empty(rows, z.options());
    at::Tensor r = at::empty({saved_rows, k}, z.options());
    at::Tensor q = at::empty({saved_rows, k}, z.options());
    at::Tensor state = at::empty({0, 0, saved ? 1 : 0}, z.options().dtype(at::kByte));
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({z, W, V, B, A, r, q, state});
    return f;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                  torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::autograd::variable_list out(kNumInputs + 1);  // (none for the plan)
    if (!grads[0].defined()) return out;
    for (int i = 0; i < kNumInputs; ++i)
      if (ctx->needs_input_grad(i)) out[i] = at::zeros_like(saved[i]);
    return out;
  }
};

at::Tensor noop_node(const at::Tensor& z, const at::Tensor& W, const at::Tensor& V,
                     const at::Tensor& B, const at::Tensor& A, c10::string_view plan) {
  return NoOpNode::apply(z, W, V, B, A, plan);
}

void define_ops(torch::Library& m) {
  m.def("_plan(int N, int d, int k, int m, int ell, str plan=\"auto\", bool training=True) -> str",
        &plan_for_sizes);
  m.def("_cpu_split(int N, int d, int k, int m, int ell, str plan=\"auto\", bool training=True) "
        "-> int[]",
        &cpu_split_for_sizes);
  // The device-generic ATen implementation that the CUDA backend runs, for
  // CPU tensors, so that CI without a GPU checks it.
  m.def(
      "_two_layer_square_forward_aten(Tensor z, Tensor W, Tensor V, Tensor B, "
      "Tensor A, str plan=\"auto\", bool save_for_backward=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_two_layer_square_backward_aten(Tensor grad, Tensor z, Tensor W, "
      "Tensor V, Tensor B, Tensor A, Tensor r, Tensor q, Tensor state, "
      "bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // The matrix product the CPU kernels run on (also for the benchmark).
  m.def("_cpu_matmul(Tensor a, Tensor b) -> Tensor");
  // NaN-fill every buffer from `uninitialized` from now on (or stop); returns
  // a buffer from `uninitialized` made after the switch.
  m.def("_poison_uninitialized(bool enabled) -> Tensor", &set_poison);
  // Read TORCHEXT_CUDA_KERNELS again (the library reads it once).
  m.def("_cuda_reread_switches() -> ()", &reread_cuda_switches);
  m.def("_noop_node(Tensor z, Tensor W, Tensor V, Tensor B, Tensor A, str plan=\"auto\") -> Tensor");
}

void register_ops() {
  constexpr const char* ns = "torchext_testing";
  static torch::Library defs(torch::Library::DEF, ns, std::nullopt, __FILE__, __LINE__);
  define_ops(defs);
  static torch::Library cpu(torch::Library::IMPL, ns, c10::DispatchKey::CPU, __FILE__, __LINE__);
  cpu.impl("_two_layer_square_forward_aten", &internal_forward<&forward_aten_kernel>);
  cpu.impl("_two_layer_square_backward_aten", &internal_backward<&backward_aten_kernel>);
  cpu.impl("_cpu_matmul", &cpu::cpu_matmul);
  static torch::Library meta(torch::Library::IMPL, ns, c10::DispatchKey::Meta, __FILE__, __LINE__);
  meta.impl("_two_layer_square_forward_aten", &forward_internal_meta);
  meta.impl("_two_layer_square_backward_aten", &backward_internal_meta);
  static torch::Library composite(torch::Library::IMPL, ns,
                                  c10::DispatchKey::CompositeImplicitAutograd, __FILE__, __LINE__);
  composite.impl("_noop_node", &noop_node);
}

}  // namespace
}  // namespace torchext

// Registers the ops once, from whichever thread asks first. Returns null, or
// the error message (no exception may cross into ctypes).
extern "C" TORCHEXT_EXPORT const char* torchext_register_testing_ops(void) {
  static std::once_flag once;
  static std::string error;
  try {
    std::call_once(once, &torchext::register_ops);
  } catch (const std::exception& e) {
    error = e.what();
    return error.c_str();
  }
  return nullptr;
}
