// The CPU's host-scalar concrete-dropout site and regulariser in C++ (opt-in: cd_convert.cpu_extension.enable()).
//
// The site: the computation of cd_convert/host_scalars.py (HostConcreteDropout and masked_without_grad) on the
// same noise, with the Python around the ops removed: at the paper's UCI shape (32 x 50) a site's Python glue,
// its autograd Function's Python forward and backward and the ops they dispatch cost about as much as the
// arithmetic. Inputs under kFusedMaxNumel elements take one loop per pass: the forward pass computes the
// mask and the output in double with no logarithm or exponential per element where 1 / t is a whole number
// (the default t = 0.1), the backward pass writes the input's gradient and sums the logit gradient's two
// terms in double (the Python path: float ops, float sums), so both agree with the Python path to rounding
// and are closer to a float64 reference. Larger inputs, other temperatures and strided inputs run the Python
// path's ATen ops in the same order: bitwise its results.
//
// Notation, as in host_scalars.py: theta the clamped logit, p = sigmoid(theta), w = 1 - z the relaxed keep
// mask, m = w / (1 - p) (saved), y = x * m, S = sum(g y), S_w = sum(g y w) = (1 - p) sum(g y m):
//     dL/dx = g m,   dL/dlogit = p S - (S - S_w) / t.
//
// The regulariser: cd_convert/host_regularizer.py's HostRegularizer, the same double arithmetic in the same
// order, with small weights' squared norms summed in double where the Python path squares a float32 norm (value
// and gradients equal to rounding). Its gradients w.r.t. a p-logit or a Linear's weight go to the node of a site
// that still runs in the same backward pass when there is one ("deliveries", below). Its steady-state call reads
// the logits and weights from the module tree and checks the plan still fits here ("the checked steady-state
// call", below), and its node is a plain autograd Node.

#include <torch/csrc/autograd/engine.h>  // graph_task.h: the current backward pass's id and nodes
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>  // set_history
#include <torch/csrc/autograd/python_variable.h>  // THPVariable_CheckExact, THPVariable_Unpack
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <unordered_map>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Below this many elements each pass is one single-threaded loop; larger tensors use the multi-threaded ATen
// ops, as the Python path does. The same threshold as the packed noise draw (so the loops see torch.rand's noise).
constexpr int64_t kFusedMaxNumel = 16384;

// Whether t's values can be read from its memory here: a dense CPU float32/float64 tensor.
bool readable_here(const Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// The value of a one-element tensor: read from memory where readable_here (no dispatched op), else item() (which
// also applies a lazy negation, torch._neg_view's bit).
double number(const Tensor& t) {
  if (readable_here(t) && t.numel() == 1 && !t.is_neg()) {
    if (t.scalar_type() == at::kFloat) {
      return static_cast<double>(*t.const_data_ptr<float>());
    }
    if (t.scalar_type() == at::kDouble) {
      return *t.const_data_ptr<double>();
    }
  }
  return t.item<double>();
}

double clamped(const Tensor& p_logit, double bound) {
  return std::min(std::max(number(p_logit), -bound), bound);
}

// dL/dlogit = p S - (S - S_w) / t, from S = sum(g y) and S_w = sum(g y w).
double logit_gradient(double p, double total, double kept, double temperature) {
  return p * total - (total - kept) / temperature;
}

// The logit's gradient from g y on the ATen ops (inputs too large or strided for the loops), plus ``delivered``
// (the regulariser's, see "deliveries"): under create_graph a tensor function of g y (so a gradient penalty
// differentiates through it), else a number read back. gy is overwritten.
Tensor logit_gradient_from(Tensor& gy, const Tensor& mask, double p, double inverse_kept, double temperature,
                           at::ScalarType logit_dtype, double delivered) {
  if (at::GradMode::is_enabled()) {
    Tensor total = gy.sum();
    Tensor kept = (gy * mask).sum() / inverse_kept;
    Tensor grad = (p * total - (total - kept) / temperature).to(logit_dtype);
    return delivered == 0.0 ? grad : grad + delivered;
  }
  const double total = gy.sum().item<double>();
  const double kept = gy.mul_(mask).sum().item<double>() / inverse_kept;
  return at::full({}, logit_gradient(p, total, kept, temperature) + delivered,
                  at::TensorOptions().dtype(logit_dtype).device(at::kCPU));
}

// sigmoid(-(theta + logit(u)) / t) / (1 - p), in place on the private noise buffer; the ops of
// host_scalars._scaled_mask (theta added as a number: the same float sum as adding theta * 1).
Tensor scaled_mask(Tensor& uniform, double theta, double temperature, double inverse_kept) {
  return uniform.logit_().add_(theta).mul_(-1.0 / temperature).sigmoid_().mul_(inverse_kept);
}

// 1 / temperature when it is a small whole number (the element-wise default 0.1 gives 10), else 0.
int whole_inverse(double temperature) {
  const double k = std::round(1.0 / temperature);
  return (k >= 1.0 && k <= 64.0 && std::abs(k - 1.0 / temperature) < 1e-9) ? static_cast<int>(k) : 0;
}

// The mask and the output in one pass, without a logarithm or an exponential per element:
//     m = sigmoid(-(theta + logit u) / t) / (1 - p) = s / (1 + c (u / (1 - u))^k),
// c = exp(theta / t), k = 1 / t a whole number, s = 1 / (1 - p); in double, then rounded once (u = 0 gives the
// kept unit, m = s, as logit(0) = -inf does; u near 1 overflows c r^k to inf: m = 0, the dropped unit).
// The mask overwrites the noise buffer u; y = x m.
template <typename scalar_t>
void fused_forward(scalar_t* u, const scalar_t* x, scalar_t* y, int64_t n, double c, int k, double s) {
  for (int64_t i = 0; i < n; ++i) {
    const double uu = static_cast<double>(u[i]);
    double base = uu / (1.0 - uu), power = 1.0;
    for (int e = k; e > 0; e >>= 1) {
      if (e & 1) power *= base;
      base *= base;
    }
    const scalar_t m = static_cast<scalar_t>(s / (1.0 + c * power));
    u[i] = m;
    y[i] = x[i] * m;
  }
}

// The mask (in place on the private noise buffer) and y = x m: one fused pass for small contiguous inputs at a
// temperature whose inverse is a whole number, else the ATen ops of the Python path.
std::pair<Tensor, Tensor> mask_and_output(const Tensor& x, Tensor& uniform, double theta, double temperature,
                                          double inverse_kept) {
  const int k = whole_inverse(temperature);
  // |theta / t| <= 700 keeps c finite and nonzero (c = inf with u = 0, or 0 with u near 1, would give 0 * inf).
  if (k > 0 && std::abs(theta / temperature) <= 700.0 && x.numel() < kFusedMaxNumel && x.is_contiguous() &&
      uniform.is_contiguous() && x.scalar_type() == uniform.scalar_type()) {
    Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    const double c = std::exp(theta / temperature);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cd_convert_site_forward", [&] {
      fused_forward<scalar_t>(uniform.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                              x.numel(), c, k, inverse_kept);
    });
    return {uniform, y};
  }
  Tensor mask = scaled_mask(uniform, theta, temperature, inverse_kept);
  return {mask, x * mask};
}

Tensor draw(const Tensor& x, const c10::optional<Tensor>& uniform) {
  if (uniform.has_value()) {
    return *uniform;  // drawn by the caller (the packed draw of large float32 masks): overwritten here
  }
  return at::rand(x.sizes(), x.options());  // torch.rand, as cd_convert.noise does for small masks
}

// One pass over the elements: the input's gradient g m (when wanted) and the sums S = sum(g y) and
// sum(g y m), in double. ``activation`` is x (then g y = (g m) x, rounded as the Python path's ops) or, with
// save_output, y.
template <typename scalar_t>
void fused_backward(const Tensor& grad_y, const Tensor& mask, const Tensor& activation, bool saved_output,
                    Tensor* grad_x, double* total, double* kept) {
  const scalar_t* g = grad_y.data_ptr<scalar_t>();
  const scalar_t* m = mask.data_ptr<scalar_t>();
  const scalar_t* a = activation.data_ptr<scalar_t>();
  scalar_t* gx = grad_x != nullptr ? grad_x->data_ptr<scalar_t>() : nullptr;
  const int64_t n = mask.numel();
  double s = 0.0, sw = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v = g[i] * m[i];
    if (gx != nullptr) {
      gx[i] = v;
    }
    const double gy = saved_output ? static_cast<double>(g[i] * a[i]) : static_cast<double>(v * a[i]);
    s += gy;
    sw += gy * static_cast<double>(m[i]);
  }
  *total = s;
  *kept = sw;
}

// -------------------------------------------------------------------------------------------- deliveries
//
// The regulariser reads each site's p-logit and each targeted Linear's weight, which the sites' nodes read too.
// Where two nodes' gradients meet at one leaf the engine adds them, and each of the regulariser's gradients is a
// tensor built for the purpose: on the UCI step (two sites, two weights) seven more ops in the backward pass
// (two 0-dim logit gradients, one multi-tensor multiply, four sums), each a dispatch whose fixed cost is the
// step's cost at that size. So where a site's node (HostSite: the logit; HostSiteLinear: the logit and the
// weight) will still run later in the same backward pass, the regulariser hands it the number instead: the node
// adds it where it computes its own gradient for the same leaf (a double to the logit's sum; the weight's term
// s W as addmm's beta: addmm(W, g^T, x m, beta = s)), and the regulariser returns no gradient for that leaf.
// The leaf's total is the same sum, rounded once less.
//
// A delivery is made only when it provably arrives: the node is alive (its mailbox can be locked), executes in
// the current graph task (runs_in_current_task), has not run in this task yet, will compute that output
// (task_should_compute_output), and sends it along the very edge the regulariser's gradient would take (the same
// gradient edge). Otherwise (the regulariser computed before the forward pass, so that its node runs last; the
// regulariser alone; a second forward pass whose nodes are not in this graph; create_graph) the regulariser
// returns the gradient itself.

// The output edges of the site nodes that take deliveries (their forward's inputs: x, p_logit, weight, ...).
constexpr size_t kLogitEdge = 1;
constexpr size_t kWeightEdge = 2;  // HostSiteLinear only

// What a site's node receives from the regulariser within one backward pass. Owned by the node alone (in its
// saved_data): the registry below holds it weakly, so a mailbox that can still be locked belongs to a node that
// is alive. The node is not referenced weakly itself: a weak reference would defer freeing a dead node, and with
// it the tensors it saved, until the reference went.
struct Mailbox : torch::CustomClassHolder {
  torch::autograd::Node* node = nullptr;  // its node, set once the node exists
  int64_t ran_in = -1;        // the graph task in which the node's backward last ran
  int64_t delivered_in = -1;  // the graph task of the values below
  double logit = 0.0;         // added to dL/dlogit
  double weight_scale = 0.0;  // dL/dW gets weight_scale * W added
  bool has_weight = false;
};

// The regulariser's gradients a node received, taken out of its mailbox when the node runs.
struct Delivery {
  double logit = 0.0;
  double weight_scale = 0.0;
  bool has_weight = false;
};

std::mutex& delivery_mutex() {
  static std::mutex mutex;
  return mutex;
}

// The site nodes alive, by the TensorImpl of each leaf they take a delivery for (the p-logit, the weight).
using Registry = std::unordered_map<const c10::TensorImpl*, std::vector<c10::weak_intrusive_ptr<Mailbox>>>;

Registry& registry() {
  static Registry entries;
  return entries;
}

// Registers the node that produced y (a new HostSite or HostSiteLinear node) under its leaves. Expired entries
// (nodes freed with their graph) are dropped every 256 registrations, so the registry holds about the nodes alive.
void post(const Tensor& y, const c10::intrusive_ptr<Mailbox>& box, std::initializer_list<const Tensor*> leaves) {
  torch::autograd::Node* node = y.grad_fn().get();
  if (node == nullptr) {
    return;
  }
  box->node = node;
  static uint64_t posts = 0;
  std::lock_guard<std::mutex> lock(delivery_mutex());
  Registry& entries = registry();
  for (const Tensor* leaf : leaves) {
    if (leaf->requires_grad()) {
      entries[leaf->unsafeGetTensorImpl()].emplace_back(box);
    }
  }
  if (++posts % 256 == 0) {
    for (auto it = entries.begin(); it != entries.end();) {
      auto& boxes = it->second;
      boxes.erase(std::remove_if(boxes.begin(), boxes.end(), [](const auto& w) { return w.expired(); }), boxes.end());
      it = boxes.empty() ? entries.erase(it) : std::next(it);
    }
  }
}

// Whether node executes in the current graph task: it is in the task's graph and, when the task runs only part
// of it (torch.autograd.grad, backward with inputs=: a non-empty exec_info), its part. The test of torch's own
// torch._C._will_engine_execute_node.
bool runs_in_current_task(torch::autograd::Node* node) {
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  const auto* nodes = torch::autograd::get_current_graph_task_nodes_in_graph();
  if (exec_info == nullptr || nodes == nullptr || nodes->count(node) == 0) {
    return false;
  }
  if (exec_info->empty()) {
    return true;
  }
  const auto it = exec_info->find(node);
  return it != exec_info->end() && it->second.should_execute();
}

// Hands value (a logit gradient, or the factor s of a weight gradient s W) for the leaf ``leaf`` (its TensorImpl,
// the registry's key), whose gradient would otherwise go along ``target``, to a site node that will take it in
// this backward pass (see above), through that node's output edge ``edge`` (kLogitEdge or kWeightEdge). Returns
// false, delivering nothing, when there is no such node.
bool deliver(const c10::TensorImpl* leaf, const torch::autograd::Edge& target, size_t edge, double value) {
  const int task = torch::autograd::get_current_graph_task_id();
  if (task < 0 || !target.is_valid()) {
    return false;
  }
  std::lock_guard<std::mutex> lock(delivery_mutex());
  Registry& entries = registry();
  const auto found = entries.find(leaf);
  if (found == entries.end()) {
    return false;
  }
  for (auto it = found->second.rbegin(); it != found->second.rend(); ++it) {  // the newest node first
    // A mailbox that locks belongs to a live node; the node is read only once it is known to be in this task.
    c10::intrusive_ptr<Mailbox> box = it->lock();
    if (!box || box->node == nullptr || box->ran_in == task || !runs_in_current_task(box->node)) {
      continue;
    }
    torch::autograd::Node* node = box->node;
    if (edge >= node->num_outputs()) {
      continue;
    }
    const torch::autograd::Edge& next = node->next_edge(edge);
    if (next.function != target.function || next.input_nr != target.input_nr ||
        !node->task_should_compute_output(edge)) {
      continue;
    }
    if (box->delivered_in != task) {
      box->delivered_in = task;
      box->logit = box->weight_scale = 0.0;
      box->has_weight = false;
    }
    if (edge == kWeightEdge) {
      box->weight_scale += value;
      box->has_weight = true;
    } else {
      box->logit += value;
    }
    return true;
  }
  return false;
}

void keep(AutogradContext* ctx, const c10::intrusive_ptr<Mailbox>& box) {
  ctx->saved_data["mailbox"] = c10::IValue::make_capsule(box);
}

// What the regulariser delivered to this node in the current backward pass (nothing outside one), marking the
// node as run there: a later delivery in the same pass would arrive too late and is refused.
Delivery collect(AutogradContext* ctx) {
  auto box = c10::static_intrusive_pointer_cast<Mailbox>(ctx->saved_data["mailbox"].toCapsule());
  const int task = torch::autograd::get_current_graph_task_id();
  std::lock_guard<std::mutex> lock(delivery_mutex());
  Delivery delivery;
  if (task >= 0 && box->delivered_in == task) {
    delivery = {box->logit, box->weight_scale, box->has_weight};
  }
  box->ran_in = task;
  box->delivered_in = -1;
  return delivery;
}

struct HostSite : public torch::autograd::Function<HostSite> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& p_logit, Tensor uniform,
                        double temperature, double bound, bool save_output, const c10::intrusive_ptr<Mailbox>& box) {
    const double theta = clamped(p_logit, bound);
    const double odds = std::exp(theta);  // p / (1 - p)
    const double inverse_kept = 1.0 + odds;
    auto [mask, y] = mask_and_output(x, uniform, theta, temperature, inverse_kept);
    ctx->saved_data["p"] = odds / inverse_kept;
    ctx->saved_data["inverse_kept"] = inverse_kept;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["save_output"] = save_output;
    ctx->saved_data["logit_dtype"] = static_cast<int64_t>(p_logit.scalar_type());
    keep(ctx, box);
    ctx->save_for_backward({mask, save_output ? y : x});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Delivery delivery = collect(ctx);
    const auto saved = ctx->get_saved_variables();
    const Tensor& mask = saved[0];
    const Tensor& activation = saved[1];
    const Tensor& grad_y = grads[0];
    const double p = ctx->saved_data["p"].toDouble();
    const double inverse_kept = ctx->saved_data["inverse_kept"].toDouble();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const bool saved_output = ctx->saved_data["save_output"].toBool();
    const auto logit_dtype = static_cast<at::ScalarType>(ctx->saved_data["logit_dtype"].toInt());
    const bool needs_x = ctx->needs_input_grad(0);
    const bool needs_logit = ctx->needs_input_grad(1);
    const auto logit_options = at::TensorOptions().dtype(logit_dtype).device(at::kCPU);
    Tensor grad_x, grad_logit;
    const bool fusable = needs_logit && !at::GradMode::is_enabled() && mask.numel() < kFusedMaxNumel &&
                         grad_y.scalar_type() == mask.scalar_type() &&
                         activation.scalar_type() == mask.scalar_type() && grad_y.is_contiguous() &&
                         mask.is_contiguous() && activation.is_contiguous();
    if (fusable) {
      if (needs_x) {
        grad_x = at::empty_like(mask);
      }
      double total = 0.0, kept = 0.0;
      AT_DISPATCH_FLOATING_TYPES(mask.scalar_type(), "cd_convert_site_backward", [&] {
        fused_backward<scalar_t>(grad_y, mask, activation, saved_output, needs_x ? &grad_x : nullptr, &total, &kept);
      });
      kept /= inverse_kept;  // sum(g y w)
      grad_logit = at::full({}, logit_gradient(p, total, kept, temperature) + delivery.logit, logit_options);
    } else {
      if (needs_x || !saved_output) {
        grad_x = grad_y * mask;
      }
      if (needs_logit) {
        Tensor gy = saved_output ? grad_y * activation : grad_x * activation;  // g y
        grad_logit = logit_gradient_from(gy, mask, p, inverse_kept, temperature, logit_dtype, delivery.logit);
      }
    }
    return {needs_x ? grad_x : Tensor(), grad_logit, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// One site call with the site's own noise. needs_grad: the autograd Function; otherwise x * m with no node
// (Monte Carlo prediction, or a held rate in front of an input that needs no gradient).
Tensor site(const Tensor& x, const Tensor& p_logit, const c10::optional<Tensor>& uniform, double temperature,
            double bound, bool save_output, bool needs_grad) {
  Tensor noise = draw(x, uniform);
  if (needs_grad) {
    auto box = c10::make_intrusive<Mailbox>();
    Tensor y = HostSite::apply(x, p_logit, noise, temperature, bound, save_output, box);
    post(y, box, {&p_logit});
    return y;
  }
  const double theta = clamped(p_logit, bound);
  return mask_and_output(x, noise, theta, temperature, 1.0 + std::exp(theta)).second;
}

// ------------------------------------------------------------------------------------------ site + Linear

// t as a matrix of rows of ``width``: t itself when it is one already (a reshape would dispatch a view op, which
// at the UCI shape costs about as much as the arithmetic).
Tensor as_rows(const Tensor& t, int64_t width) {
  return t.dim() == 2 ? t : t.reshape({-1, width});
}

// A targeted Linear's input site and the Linear itself in one autograd node: y = (x m) W^T + b. At the UCI
// shape the step's cost is per node and per op; one node replaces the site's and the Linear's three (the
// site, addmm, the weight's transpose), and the backward pass dispatches two matmuls, one sum and one loop.
// Saved: the mask and x m (the Linear's own saved input), as the site and the Linear would save them.
struct HostSiteLinear : public torch::autograd::Function<HostSiteLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& p_logit, const Tensor& weight,
                        const c10::optional<Tensor>& bias, Tensor uniform, double temperature, double bound,
                        const c10::intrusive_ptr<Mailbox>& box) {
    const double theta = clamped(p_logit, bound);
    const double odds = std::exp(theta);
    const double inverse_kept = 1.0 + odds;
    auto [mask, xm] = mask_and_output(x, uniform, theta, temperature, inverse_kept);
    const Tensor rows = as_rows(xm, weight.size(1));
    Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, rows, weight.t()) : at::mm(rows, weight.t());
    ctx->saved_data["p"] = odds / inverse_kept;
    ctx->saved_data["inverse_kept"] = inverse_kept;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["logit_dtype"] = static_cast<int64_t>(p_logit.scalar_type());
    keep(ctx, box);
    ctx->save_for_backward({mask, xm, weight});
    if (x.dim() == 2) {
      return y;
    }
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = weight.size(0);
    return y.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Delivery delivery = collect(ctx);
    const auto saved = ctx->get_saved_variables();
    const Tensor& mask = saved[0];
    const Tensor& xm = saved[1];
    const Tensor& weight = saved[2];
    const Tensor g = as_rows(grads[0], weight.size(0));
    const double p = ctx->saved_data["p"].toDouble();
    const double inverse_kept = ctx->saved_data["inverse_kept"].toDouble();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const auto logit_dtype = static_cast<at::ScalarType>(ctx->saved_data["logit_dtype"].toInt());
    const bool needs_x = ctx->needs_input_grad(0), needs_logit = ctx->needs_input_grad(1);
    const auto logit_options = at::TensorOptions().dtype(logit_dtype).device(at::kCPU);
    Tensor grad_x, grad_logit, grad_weight, grad_bias;
    if (needs_x || needs_logit) {
      Tensor grad_xm = g.mm(weight);  // dL/d(x m)
      if (mask.dim() != 2) {
        grad_xm = grad_xm.view(mask.sizes());
      }
      // Under create_graph (a gradient penalty) the ATen ops: every gradient stays a tensor function of g.
      if (!at::GradMode::is_enabled() && mask.numel() < kFusedMaxNumel && mask.is_contiguous() && xm.is_contiguous() &&
          grad_xm.scalar_type() == mask.scalar_type()) {
        double total = 0.0, kept = 0.0;
        if (needs_x) {
          grad_x = at::empty_like(mask);
        }
        AT_DISPATCH_FLOATING_TYPES(mask.scalar_type(), "cd_convert_site_linear_backward", [&] {
          fused_backward<scalar_t>(grad_xm, mask, xm, true, needs_x ? &grad_x : nullptr, &total, &kept);
        });
        kept /= inverse_kept;
        if (needs_logit) {
          grad_logit = at::full({}, logit_gradient(p, total, kept, temperature) + delivery.logit, logit_options);
        }
      } else {
        if (needs_x) {
          grad_x = grad_xm * mask;
        }
        if (needs_logit) {
          Tensor gy = grad_xm * xm;  // g y of the site's output y = x m
          grad_logit = logit_gradient_from(gy, mask, p, inverse_kept, temperature, logit_dtype, delivery.logit);
        }
      }
    }
    if (ctx->needs_input_grad(2)) {
      const Tensor rows = as_rows(xm, weight.size(1));
      // With the regulariser's s W delivered: s W + g^T (x m) in one op.
      grad_weight = delivery.has_weight ? at::addmm(weight, g.t(), rows, delivery.weight_scale, 1.0) : g.t().mm(rows);
    }
    if (ctx->needs_input_grad(3)) {
      grad_bias = g.sum(0);
    }
    return {grad_x, grad_logit, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor site_linear(const Tensor& x, const Tensor& p_logit, const Tensor& weight, const c10::optional<Tensor>& bias,
                   const c10::optional<Tensor>& uniform, double temperature, double bound) {
  auto box = c10::make_intrusive<Mailbox>();
  Tensor y = HostSiteLinear::apply(x, p_logit, weight, bias, draw(x, uniform), temperature, bound, box);
  post(y, box, {&p_logit, &weight});
  return y;
}

// ------------------------------------------------------------------------------------------- regulariser

// The constants of one regulariser plan (host_regularizer.HostTerms), built once per plan.
struct RegularizerPlan {
  std::vector<double> bounds;
  std::vector<double> dropout_units;
  double weight_regularizer;
  // Per application, the (weight index, count) pairs of the consumer weights it reads.
  std::vector<std::vector<std::pair<int64_t, double>>> reads;
  at::ScalarType logit_dtype;
};

double log_sigmoid(double v) {  // log(sigmoid(v)) without overflow or cancellation, as host_regularizer.py
  if (v >= 0.0) {
    return -std::log1p(std::exp(-v));
  }
  return v - std::log1p(std::exp(v));
}

// Whether w's squared norm is summed by the loop of squared_norms: a small contiguous CPU float32/float64 tensor.
bool summed_here(const Tensor& w) {
  return readable_here(w) && w.is_contiguous() && w.numel() < kFusedMaxNumel;
}

// ||w||^2 of each weight in double. Small weights (summed_here, all of them): one loop each, the squares summed in
// double, no op dispatched (at the UCI shape the norm op and the reads cost more than the arithmetic). Otherwise
// the Python path's ops (one _foreach_norm, each norm read and squared): bitwise its values.
std::vector<double> squared_norms(at::TensorList weights) {
  std::vector<double> squared;
  squared.reserve(weights.size());
  if (std::all_of(weights.begin(), weights.end(), summed_here)) {
    for (const Tensor& w : weights) {
      double sum = 0.0;
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "cd_convert_squared_norm", [&] {
        const scalar_t* values = w.const_data_ptr<scalar_t>();
        for (int64_t i = 0, n = w.numel(); i < n; ++i) {
          const double v = static_cast<double>(values[i]);
          sum += v * v;
        }
      });
      squared.push_back(sum);
    }
  } else if (!weights.empty()) {
    for (const Tensor& norm : at::_foreach_norm(weights, 2)) {
      const double v = norm.item<double>();
      squared.push_back(v * v);
    }
  }
  return squared;
}

// The regulariser's node: its gradients were computed in the forward pass (as numbers, per logit and per weight
// factor), so the backward pass scales them by the incoming gradient and delivers or returns them. A plain Node
// rather than a torch::autograd::Function: the Function machinery (its context's keyed saved data, the inputs'
// and outputs' metadata, output wrapping) costs more than this node's own work at the UCI step's size.
struct RegularizerBackward : public torch::autograd::Node {
  std::vector<double> logit_grads;    // dR/dlogit_a
  std::vector<double> weight_scales;  // dR/dW_j = weight_scales[j] W_j
  // The TensorImpl of each logit, then of each weight: the keys of their site nodes' mailboxes (the leaves stay
  // alive with this node's next edges, whose gradient accumulators hold them).
  std::vector<const c10::TensorImpl*> leaves;
  std::vector<torch::autograd::SavedVariable> weights;
  at::ScalarType logit_dtype = at::kFloat;

  std::string name() const override {
    return "CdConvertRegularizerBackward";
  }

  void release_variables() override {
    for (auto& weight : weights) {
      weight.reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
    // Deliveries only outside create_graph: there the site nodes build every gradient as a tensor function.
    const bool may_deliver = !at::GradMode::is_enabled();
    variable_list outputs;
    {
      at::NoGradGuard no_grad;
      outputs = gradients(grads[0], may_deliver);
    }
    const bool graph_wanted = at::GradMode::is_enabled() && grads[0].defined() && grads[0].requires_grad();
    if (!graph_wanted) {
      return outputs;
    }
    // create_graph through a gradient that itself needs one: the first-order gradients, and an error if they
    // are differentiated again, as Python's @once_differentiable gives the Python path.
    variable_list inputs;
    inputs.reserve(outputs.size());
    for (const Tensor& t : outputs) {
      if (t.defined()) {
        Tensor alias = t.detach();
        alias.set_requires_grad(true);
        inputs.push_back(alias);
      } else {
        inputs.emplace_back();
      }
    }
    auto error = std::make_shared<torch::autograd::DelayedError>(
        "trying to differentiate twice cd_convert's regulariser, which is once differentiable",
        static_cast<int64_t>(inputs.size()));
    return (*error)(std::move(inputs));
  }

  // The gradient of each input (logits, then weights): nothing where it is not needed or (may_deliver) a site node
  // that runs later in this backward pass takes it (see "deliveries").
  variable_list gradients(const Tensor& grad, bool may_deliver) {
    const size_t count = logit_grads.size();
    variable_list out(count + weights.size());
    // Unpacked first, whether delivered or not: a second backward pass through a freed graph, or a weight changed
    // in place since the forward pass, raises autograd's usual error.
    std::vector<Tensor> saved;
    saved.reserve(weights.size());
    for (const auto& weight : weights) {
      saved.push_back(weight.unpack());
    }
    if (!grad.defined()) {
      return out;
    }
    const double g = number(grad);
    const auto options = at::TensorOptions().dtype(logit_dtype).device(at::kCPU);
    for (size_t a = 0; a < count; ++a) {
      const double value = logit_grads[a] * g;
      if (task_should_compute_output(a) && !(may_deliver && deliver(leaves[a], next_edge(a), kLogitEdge, value))) {
        out[a] = at::scalar_tensor(value, options);
      }
    }
    std::vector<Tensor> kept;
    std::vector<at::Scalar> scales;
    std::vector<size_t> positions;
    for (size_t j = 0; j < saved.size(); ++j) {
      const size_t i = count + j;
      const double scale = weight_scales[j] * g;
      if (task_should_compute_output(i) && !(may_deliver && deliver(leaves[i], next_edge(i), kWeightEdge, scale))) {
        kept.push_back(saved[j]);
        scales.emplace_back(scale);
        positions.push_back(i);
      }
    }
    if (!kept.empty()) {
      // Python numbers keep each gradient in its weight's dtype; 2 W * 0 = 0 for a zero weight.
      const auto products = at::_foreach_mul(kept, scales);
      for (size_t k = 0; k < positions.size(); ++k) {
        out[positions[k]] = products[k];
      }
    }
    return out;
  }
};

// The regulariser of plan from its logits and weights (host_regularizer.HostRegularizer's arithmetic), with a
// RegularizerBackward node when gradients are recorded and an input requires one.
Tensor regularize(const RegularizerPlan& plan, at::TensorList logits, at::TensorList weights) {
  TORCH_CHECK(logits.size() == plan.bounds.size(), "cd_convert's regulariser plan has ", plan.bounds.size(),
              " applications but was given ", logits.size(), " logits");
  // The Function this node replaced raised on dual tensors (no jvp); a plain node would drop their tangents.
  const auto dual = [](const Tensor& t) { return torch::autograd::isFwGradDefined(t); };
  TORCH_CHECK_NOT_IMPLEMENTED(std::none_of(logits.begin(), logits.end(), dual) &&
                                  std::none_of(weights.begin(), weights.end(), dual),
                              "forward-mode AD (a dual tensor among the p-logits or consumer weights) is not "
                              "implemented for cd_convert's regulariser");
  const auto requires_grad = [](const Tensor& t) { return t.requires_grad(); };
  const bool record = at::GradMode::is_enabled() && (std::any_of(logits.begin(), logits.end(), requires_grad) ||
                                                     std::any_of(weights.begin(), weights.end(), requires_grad));
  at::NoGradGuard no_grad;  // the norms of large weights are ops: no graph for them
  const std::vector<double> squared = squared_norms(weights);
  const double wr = plan.weight_regularizer;
  double total = 0.0;
  std::vector<double> logit_grads;
  logit_grads.reserve(logits.size());
  std::vector<double> weight_scales(weights.size(), 0.0);
  for (size_t a = 0; a < logits.size(); ++a) {
    const double theta = clamped(logits[a], plan.bounds[a]);
    const double log_p = log_sigmoid(theta), log_kept = log_sigmoid(-theta);
    const double p = std::exp(log_p), kept = std::exp(log_kept);
    const double inverse_kept = 1.0 + std::exp(theta);
    double weight_sum = 0.0;
    for (const auto& read : plan.reads[a]) {
      weight_sum += read.second * squared[read.first];
      weight_scales[read.first] += read.second * inverse_kept;
    }
    const double units = plan.dropout_units[a];
    total += units * (p * log_p + kept * log_kept) + wr * weight_sum * inverse_kept;
    logit_grads.push_back(units * theta * p * kept + wr * weight_sum * p * inverse_kept);
  }
  Tensor out = at::full({}, total, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
  if (!record) {
    return out;
  }
  auto node = c10::make_intrusive<RegularizerBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(logits, weights));
  for (double& scale : weight_scales) {
    scale = 2.0 * wr * scale;
  }
  node->logit_grads = std::move(logit_grads);
  node->weight_scales = std::move(weight_scales);
  node->logit_dtype = plan.logit_dtype;
  node->leaves.reserve(logits.size() + weights.size());
  for (const Tensor& t : logits) {
    node->leaves.push_back(t.unsafeGetTensorImpl());
  }
  node->weights.reserve(weights.size());
  for (const Tensor& t : weights) {
    node->leaves.push_back(t.unsafeGetTensorImpl());
    node->weights.emplace_back(t, /*is_output=*/false);
  }
  torch::autograd::set_history(out, node);
  return out;
}

Tensor regularizer(const std::shared_ptr<RegularizerPlan>& plan, const std::vector<Tensor>& logits,
                   const std::vector<Tensor>& weights) {
  return regularize(*plan, logits, weights);
}

// ------------------------------------------------------------------------------- the checked steady-state call
//
// cd_convert.collector._Plan checks on every call, in Python, that the module tree is still the one it was built
// for, reads the logits and weights afresh and checks their types, devices and dtypes: at the UCI step that costs
// about as much as the regulariser's own forward pass. regularizer_of does the same reads and checks here, for the
// host path's needs, and returns None (the caller then takes the Python path, which rebuilds the plan or raises
// its usual error) when anything differs.

// An interned Python string (attribute and key names looked up on every call).
PyObject* interned(const char* text) {
  PyObject* s = PyUnicode_InternFromString(text);
  TORCH_CHECK(s != nullptr, "cd_convert: could not intern a string");
  return s;
}

// A registered parameter of module, module._parameters[name] (borrowed), or nullptr (then the Python path reads it).
PyObject* registered_parameter(PyObject* module, PyObject* name) {
  static PyObject* const parameters_name = interned("_parameters");
  PyObject* parameters = PyObject_GetAttr(module, parameters_name);
  if (parameters == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  PyObject* value = PyDict_Check(parameters) ? PyDict_GetItemWithError(parameters, name) : nullptr;
  Py_DECREF(parameters);  // the dict stays alive with the module: value remains a valid borrowed reference
  if (value == nullptr) {
    PyErr_Clear();
  }
  return value;
}

// The tensor of a plain (not subclassed) torch.Tensor or nn.Parameter object, or nullptr.
const Tensor* plain_tensor(PyObject* obj) {
  if (obj == nullptr || !THPVariable_CheckExact(obj)) {
    return nullptr;
  }
  return &THPVariable_Unpack(obj);
}

// Whether the module tree still matches ``tree`` (see regularizer_of), reading the logits and weights into
// ``logits`` and ``weights`` as it goes.
bool read_tree(const RegularizerPlan& plan, py::handle root, py::handle tree, std::vector<Tensor>& logits,
               std::vector<Tensor>& weights) {
  static PyObject* const modules_name = interned("_modules");
  static PyObject* const logit_name = interned("p_logit");
  static PyObject* const eps_name = interned("eps");
  if (!PyTuple_Check(tree.ptr()) || PyTuple_GET_SIZE(tree.ptr()) != 4) {
    return false;
  }
  PyObject* edges = PyTuple_GET_ITEM(tree.ptr(), 0);
  PyObject* sites = PyTuple_GET_ITEM(tree.ptr(), 1);
  PyObject* eps = PyTuple_GET_ITEM(tree.ptr(), 2);
  PyObject* weight_refs = PyTuple_GET_ITEM(tree.ptr(), 3);
  if (!PyTuple_Check(edges) || !PyTuple_Check(sites) || !PyTuple_Check(eps) || !PyTuple_Check(weight_refs) ||
      PyTuple_GET_SIZE(sites) != static_cast<Py_ssize_t>(plan.bounds.size()) ||
      PyTuple_GET_SIZE(eps) != PyTuple_GET_SIZE(sites)) {
    return false;
  }
  // Every module on a path to a site or a consumer weight is still where it was.
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(edges); ++i) {
    PyObject* edge = PyTuple_GET_ITEM(edges, i);  // (parent or None for the root, name, child)
    PyObject* parent = PyTuple_GET_ITEM(edge, 0);
    PyObject* modules = PyObject_GetAttr(parent == Py_None ? root.ptr() : parent, modules_name);
    if (modules == nullptr) {
      PyErr_Clear();
      return false;
    }
    PyObject* child = PyDict_Check(modules) ? PyDict_GetItemWithError(modules, PyTuple_GET_ITEM(edge, 1)) : nullptr;
    Py_DECREF(modules);
    if (child == nullptr) {
      PyErr_Clear();
      return false;
    }
    if (child != PyTuple_GET_ITEM(edge, 2)) {
      return false;
    }
  }
  // Each site's logit: a plain 0-dim CPU tensor of the plan's dtype; and its eps unchanged.
  logits.reserve(PyTuple_GET_SIZE(sites));
  for (Py_ssize_t a = 0; a < PyTuple_GET_SIZE(sites); ++a) {
    PyObject* site = PyTuple_GET_ITEM(sites, a);
    const Tensor* logit = plain_tensor(registered_parameter(site, logit_name));
    if (logit == nullptr || !readable_here(*logit) || logit->scalar_type() != plan.logit_dtype ||
        logit->dim() != 0) {
      return false;
    }
    PyObject* value = PyObject_GetAttr(site, eps_name);
    if (value == nullptr) {
      PyErr_Clear();
      return false;
    }
    const double site_eps = PyFloat_AsDouble(value);
    Py_DECREF(value);
    if (PyErr_Occurred() != nullptr) {
      PyErr_Clear();
      return false;
    }
    if (site_eps != PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(eps, a))) {
      return false;
    }
    logits.push_back(*logit);
  }
  // Each consumer weight: a plain dense CPU float32/float64 tensor.
  weights.reserve(PyTuple_GET_SIZE(weight_refs));
  for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(weight_refs); ++j) {
    PyObject* ref = PyTuple_GET_ITEM(weight_refs, j);  // (owner module, attribute name)
    const Tensor* weight = plain_tensor(registered_parameter(PyTuple_GET_ITEM(ref, 0), PyTuple_GET_ITEM(ref, 1)));
    if (weight == nullptr || !readable_here(*weight)) {
      return false;
    }
    weights.push_back(*weight);
  }
  return true;
}

// The regulariser of plan over the module tree under root, read and checked here, or None when the tree or a
// tensor no longer fits the plan. ``tree`` is the 4-tuple cd_convert.collector._Plan.native_tree builds (held by
// Python, so that no C++ object keeps modules alive out of the garbage collector's sight): the path edges
// ``(parent or None for root, name, child)``, the site modules (one per application), their eps when the plan
// was built (floats), and the ``(owner module, attribute)`` of each consumer weight, all tuples.
py::object regularizer_of(const std::shared_ptr<RegularizerPlan>& plan, py::handle root, py::handle tree) {
  std::vector<Tensor> logits, weights;
  if (!read_tree(*plan, root, tree, logits, weights)) {
    return py::none();
  }
  return py::cast(regularize(*plan, logits, weights));
}

std::shared_ptr<RegularizerPlan> make_plan(std::vector<double> bounds, std::vector<double> dropout_units,
                                           double weight_regularizer,
                                           std::vector<std::vector<std::pair<int64_t, double>>> reads,
                                           const Tensor& logit_like) {
  // The logits' dtype comes as an empty tensor of it: torch < 2.2 has no Python binding for a bare ScalarType.
  const at::ScalarType logit_dtype = logit_like.scalar_type();
  auto plan = std::make_shared<RegularizerPlan>();
  plan->bounds = std::move(bounds);
  plan->dropout_units = std::move(dropout_units);
  plan->weight_regularizer = weight_regularizer;
  plan->reads = std::move(reads);
  plan->logit_dtype = logit_dtype;
  return plan;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("site", &site, "A concrete-dropout site call on the CPU (see cd_convert/host_scalars.py).", py::arg("x"),
        py::arg("p_logit"), py::arg("uniform"), py::arg("temperature"), py::arg("bound"), py::arg("save_output"),
        py::arg("needs_grad"));
  m.def("site_linear", &site_linear, "A targeted Linear's input site and the Linear in one autograd node.",
        py::arg("x"), py::arg("p_logit"), py::arg("weight"), py::arg("bias"), py::arg("uniform"),
        py::arg("temperature"), py::arg("bound"));
  py::class_<RegularizerPlan, std::shared_ptr<RegularizerPlan>>(m, "RegularizerPlan");
  m.def("make_plan", &make_plan, "The regulariser's constants (host_regularizer.HostTerms) as a C++ object.");
  m.def("regularizer", &regularizer, "cd_convert.regularization's host path (see host_regularizer.py).");
  m.def("regularizer_of", &regularizer_of,
        "The host path's regulariser over a module tree, read and checked here; None where it no longer fits.");
}
