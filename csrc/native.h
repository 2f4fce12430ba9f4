// flopcount native capture: a dispatch key's boxed fallback, or an at::RecordFunction observer,
// that sees every aten op at the
// dispatcher without running Python, and aggregates one compact key per distinct call:
//   [op id, context id, flags (grad mode, in backward), backward module id, inputs..., outputs...]
// The FLOP formulas and the registry's rules stay in Python: flopcount/capture/native/capture.py
// classifies each op the first time it is seen (REGISTRY.lookup, pushed back with set_op_classes)
// and evaluates the formulas once per distinct key when a step closes; decode.py reads the keys.
// Compile with -DNDEBUG, like libtorch: without it the RecordFunction layout differs from
// libtorch's and inputs() fails a debug assertion.
//
// The sources, by responsibility (flopcount/capture/native/builder.py lists them):
//   native.h      the shared contract: tags, registry classes, the per-op and per-meter state
//   keys.cpp      op descriptions and the key encoder
//   observer.cpp  the two captures (capture key, RecordFunction), per-thread key tables, enable / drain
//   hooks.cpp     backward modules: gradient hooks and the module-call fast path
//   bindings.cpp  the Python module (enums, functions, KEY_VERSION)

#pragma once

#include <torch/extension.h>
#include <torch/version.h>

// RecordFunction::overload_name() and FunctionPreHook's const compiled_args() came with torch 2.7
// (capture/native/builder.py checks this before building; older torch uses the dispatch backend).
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 7)
#error "flopcount's native backend needs torch >= 2.7"
#endif

#include <ATen/record_function.h>
#include <c10/core/Event.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace flopcount_native {

// The key format's version: decode.py checks it when the extension loads. Bump it with any change
// to the tags or the key layout.
constexpr int64_t kKeyVersion = 3;

// Key tags (bound as the Python enum ``Tag``; decode.py reads them from there).
enum Tag : int64_t {
  kNone = 0, kTensor = 1, kInt = 2, kDouble = 3, kBool = 4, kString = 5, kIntList = 6,
  kDoubleList = 7, kBoolList = 8, kList = 9, kDtype = 10, kOpaque = 11, kValues = 12,
  kPendingValues = 13, kTensorDtype = 14, kScalarNotKept = 15,
};
constexpr int64_t kOutputs = -1;       // separates inputs from outputs in a key
constexpr int64_t kMaxValues = 65536;  // larger integer tensors are not read (shapes only)

// What a key keeps beyond tensor shapes (bits): small integer tensors' values (value-dependent
// formulas), tensor dtypes (communication payload bytes); kNoScalars: float scalar arguments are
// not kept (kScalarNotKept instead), for formulas that never read them, so that calls differing
// only in such a scalar (an optimizer's changing step size) share one key.
enum Extra : int { kShapeOnly = 0, kWithValues = 1, kWithDtype = 2, kNoScalars = 4 };

// How the registry classifies an op (bound as the Python enum ``Klass``): Python decides it with
// REGISTRY.lookup and pushes it (set_op_classes); kUnknown until then.
// kFormulaShapes: a formula that reads no float scalar argument (Formula.reads_scalars False).
enum Klass : int8_t {
  kUnknown = -1, kZero = 0, kFormula = 1, kUncounted = 2, kFormulaValues = 3, kCollective = 4,
  kFormulaShapes = 5,
};

// What set_context / module_call return (bits; bound as STATUS_*): strict mode found an uncounted
// op, an automatic step boundary was crossed since the last drain, Python must place the module's
// gradient hooks itself, ops were seen that Python has not classified yet.
constexpr int64_t kViolation = 1, kBoundary = 2, kPythonHooks = 4, kNewOps = 8;

struct OpInfo {
  std::string name, overload;
  int64_t id = 0;
  bool is_op = false;                  // a dispatcher op (not a named range such as autograd's)
  bool implicit = false;               // CompositeImplicitAutograd without an overriding kernel
  size_t num_returns = 0;
  std::vector<uint8_t> dtype_arg;      // argument i is a ScalarType (IValue holds an int)
  std::vector<uint8_t> no_values;      // argument i is an RNG seed/offset: never read its values
  std::vector<c10::optional<c10::IValue>> defaults;
  std::atomic<int8_t> klass{kUnknown};  // written by set_op_classes, read by the observer
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
    return static_cast<size_t>(h);
  }
};

using Table = std::unordered_map<std::vector<int64_t>, int64_t, KeyHash>;

// A key's hash for KeyCache: one multiply per value, then a final mix so that the low bits (the
// table index) depend on every value.
inline uint64_t key_hash(const int64_t* key, size_t n) noexcept {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint64_t>(key[i])) * 0x100000001b3ull;
  h ^= h >> 32;
  h *= 0xd6e8feb86659fd93ull;
  return h ^ (h >> 32);
}

// The key being built (one per thread and meter): its pushes stay inline, a few dozen per op, and
// its storage keeps its capacity, so building a key allocates nothing once it has grown.
class KeyBuffer {
 public:
  void clear() { size_ = 0; }
  C10_ALWAYS_INLINE void push_back(int64_t v) {
    if (C10_UNLIKELY(size_ == store_.size())) grow(1);
    store_[size_++] = v;
  }
  void append(const int64_t* values, size_t n) {
    if (size_ + n > store_.size()) grow(n);
    std::memcpy(store_.data() + size_, values, n * sizeof(int64_t));
    size_ += n;
  }
  const int64_t* data() const { return store_.data(); }
  size_t size() const { return size_; }
  std::vector<int64_t> to_vector() const { return std::vector<int64_t>(data(), data() + size_); }

 private:
  C10_NOINLINE void grow(size_t n) { store_.resize(std::max<size_t>(64, (size_ + n) * 2)); }
  std::vector<int64_t> store_;
  size_t size_ = 0;
};

// One thread's key -> id cache (ThreadTable::ids), looked up once per recorded op: the keys back to
// back in one array and open addressing on their hashes, so a lookup hashes the key once and
// compares it in place, and a cached key costs no node of its own.
class KeyCache {
 public:
  int64_t find(const KeyBuffer& key, uint64_t h) const {  // -1: not cached
    if (slots_.empty()) return -1;
    const size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      const Entry& e = slots_[i];
      if (e.length == 0) return -1;
      if (e.hash == h && e.length == key.size() &&
          std::memcmp(arena_.data() + e.offset, key.data(), key.size() * sizeof(int64_t)) == 0) {
        return e.id;
      }
    }
  }
  void insert(const KeyBuffer& key, uint64_t h, int64_t id) {  // key not cached yet
    if ((count_ + 1) * 2 > slots_.size()) grow();
    place(Entry{h, arena_.size(), key.size(), id});
    arena_.insert(arena_.end(), key.data(), key.data() + key.size());
    ++count_;
  }
  void clear() {
    slots_.clear();
    arena_.clear();
    count_ = 0;
  }
  size_t size() const { return count_; }

 private:
  struct Entry {
    uint64_t hash = 0;
    size_t offset = 0;  // into arena_
    size_t length = 0;  // 0: an empty slot (keys are never empty)
    int64_t id = 0;
  };
  void place(const Entry& e) {
    const size_t mask = slots_.size() - 1;
    size_t i = e.hash & mask;
    while (slots_[i].length != 0) i = (i + 1) & mask;
    slots_[i] = e;
  }
  void grow() {
    std::vector<Entry> old(std::max<size_t>(256, slots_.size() * 2));
    old.swap(slots_);
    for (const Entry& e : old) {
      if (e.length != 0) place(e);
    }
  }
  std::vector<Entry> slots_;  // a power of two, at most half full
  std::vector<int64_t> arena_;
  size_t count_ = 0;
};

// key id -> calls, iterated in first-call order. Open addressing over arrays that are reused (clear
// keeps them), so counting a steady step's calls allocates nothing, and a steady step's calls come
// out in the same order every step (drain relies on that: see Slot::recent_planned).
class CallCounts {
 public:
  void add(int64_t id, int64_t calls) {
    if ((order_.size() + 1) * 2 > slots_.size()) grow();
    const size_t mask = slots_.size() - 1;
    size_t i = static_cast<size_t>((static_cast<uint64_t>(id) * 0x9e3779b97f4a7c15ull) >> 32) & mask;
    while (slots_[i].id != kEmpty && slots_[i].id != id) i = (i + 1) & mask;
    if (slots_[i].id == kEmpty) {
      slots_[i].id = id;
      order_.push_back(i);
    }
    slots_[i].calls += calls;
  }
  template <typename F>
  void for_each(F&& f) const {  // f(key id, calls), in first-call order
    for (size_t i : order_) f(slots_[i].id, slots_[i].calls);
  }
  size_t size() const { return order_.size(); }
  void clear() {
    for (size_t i : order_) slots_[i] = Entry{};
    order_.clear();
  }

 private:
  static constexpr int64_t kEmpty = -1;  // key ids are >= 0
  struct Entry {
    int64_t id = kEmpty;
    int64_t calls = 0;
  };
  void grow() {
    std::vector<Entry> old(std::max<size_t>(64, slots_.size() * 2));
    old.swap(slots_);
    std::vector<size_t> old_order;
    old_order.swap(order_);
    for (size_t i : old_order) add(old[i].id, old[i].calls);  // the same order
  }
  std::vector<Entry> slots_;  // a power of two, at most half full
  std::vector<size_t> order_;  // slots in first-call order
};

struct Generation {
  CallCounts calls;                                // key id -> calls
  std::unordered_map<int64_t, int64_t> uncounted;  // op id -> calls
  void clear() {
    calls.clear();
    uncounted.clear();
  }
};

struct PendingValues {  // a device tensor's values on their way to pinned host memory
  at::Tensor host;
  std::unique_ptr<c10::Event> ready;
};

// Shared by every meter: op descriptions and interned strings.
struct State {
  std::mutex mu;
  std::vector<std::unique_ptr<OpInfo>> ops;                  // by id; never freed
  std::unordered_map<const char*, OpInfo*> ops_by_name_ptr;  // fast path
  std::unordered_map<std::string, OpInfo*> ops_by_name;      // "name.overload"
  std::unordered_map<std::string, int64_t> string_ids;
  std::vector<std::string> strings;
  std::atomic<int64_t> described{0};  // ops.size()
  std::atomic<int64_t> classified{0};  // ops [0, classified) have a class pushed from Python
};

State& state();

// The calls one thread recorded for one meter since the last drain, by generation (automatic step
// boundaries). Written by its thread only; drain swaps it out (see ThreadTable).
struct Counts {
  int64_t first = 0;  // the slot's generation number of gens[0]
  std::deque<Generation> gens;
  std::vector<Generation> spare;  // emptied by drain (recycle), their arrays kept for the next step
  Generation& at(int64_t generation) {
    if (gens.empty()) first = generation;
    if (generation < first) generation = first;  // a boundary raced with a drain: the oldest kept
    while (first + static_cast<int64_t>(gens.size()) <= generation) {
      if (spare.empty()) {
        gens.emplace_back();
      } else {
        gens.push_back(std::move(spare.back()));
        spare.pop_back();
      }
    }
    return gens[static_cast<size_t>(generation - first)];
  }
  void recycle() {  // drain has read every generation
    for (auto& gen : gens) {
      if (spare.size() >= kSpareGenerations) break;
      gen.clear();
      spare.push_back(std::move(gen));
    }
    gens.clear();
  }
  static constexpr size_t kSpareGenerations = 2;
};

// One thread's key table for one meter, merged at drain (like torch's profiler, which gives each
// thread its own queue): the recording thread takes no lock. It marks itself ``busy`` while it
// writes to ``active``; drain swaps ``active`` for the spare and waits until the writer is not busy
// on the old one before reading it.
struct ThreadTable {
  int64_t incarnation = 0;  // the meter (Slot::incarnation) this table belongs to
  int64_t key_epoch = 0;    // Slot::key_epoch when ``ids`` was filled
  KeyCache ids;             // key -> id, as interned in the slot (the owner thread's cache)
  std::unordered_map<std::string, int64_t> string_ids;  // the owner thread's cache of interned strings
  Counts buffers[2];
  std::atomic<Counts*> active{&buffers[0]};
  std::atomic<bool> busy{false};
};

// One per active meter (nested meters each count their block). The callback is thread-local,
// like a TorchDispatchMode: it follows the meter's thread and autograd's workers for it (they
// inherit the thread-local state), not threads the program starts itself.
using LeafRef = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;  // a leaf tensor, weakly

struct Slot {
  std::mutex mu;  // guards everything below except the atomics; never taken per recorded op
  std::vector<std::shared_ptr<ThreadTable>> tables;  // every thread's table for this meter
  // Keys get ids that stay valid across drains, so that Python sees each distinct key once and
  // afterwards only (id, calls). Keys naming device-value copies are per drain: never interned.
  Table key_ids;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> new_keys;  // since the last drain
  int64_t next_key_id = 0;
  bool keys_reset = false;  // key_ids was cleared (too many distinct keys): Python forgets ids
  int64_t drained = 0;      // the generation number the next drain starts with
  // By key id: Python has booked the key with a plan it keeps (set_planned), so drain hands its
  // calls over apart from the rest: a steady step's planned calls repeat and are reused whole.
  std::vector<uint8_t> planned;
  std::vector<PendingValues> pending_values;
  std::vector<Generation> merged;  // drain's scratch (drain holds its lock): the tables' counts summed
  // drain's other scratch, kept with their capacity: allocating these each step (hundreds of
  // entries) cost more than the rest of a steady drain. Per generation: whether each call's key
  // is planned (in the calls' iteration order); one generation's planned calls.
  std::vector<std::vector<uint8_t>> drain_flags;
  std::vector<std::pair<int64_t, int64_t>> drain_planned;
  // The Python dicts of planned calls that recent drains handed over, with their content ((key id,
  // calls) in order): a steady step's are the same, so drain hands over the same dict and Python
  // finds its summed totals by identity (capture.py _book). Touched by drain only (drain_mu), and
  // by enable/release, all with the GIL held.
  std::vector<std::pair<std::vector<std::pair<int64_t, int64_t>>, py::object>> recent_planned;
  // Backward modules, per autograd graph task: module ids, innermost last (see hooks.cpp).
  std::unordered_map<int64_t, std::vector<int64_t>> backward_stacks;
  // Hooks placed on leaf tensors (hooks.cpp hook_leaf), removed at clear_backward_modules.
  std::vector<std::pair<LeafRef, const void*>> leaf_hooks;
  std::vector<std::string> module_names;  // by module id, as Python names them
  int64_t root_module = -1;               // the id of the outermost module's name, once named
  std::string violation;                  // strict mode: first uncounted op
  c10::optional<at::CallbackHandle> handle;  // the observer, or the key meter's marker (observer.cpp)
  bool by_key = false;                       // captures through the dispatch key, not RecordFunction
  bool in_use = false;

  std::atomic<int64_t> context{0};
  std::atomic<bool> optimizer{false};
  std::atomic<bool> pending_boundary{false};
  std::atomic<bool> boundary_crossed{false};  // a step boundary was opened since the last drain
  std::atomic<int64_t> generation{0};         // the open generation's number (boundaries crossed)
  std::atomic<bool> strict{false};
  std::atomic<bool> has_violation{false};
  std::atomic<bool> has_backward_modules{false};
  std::atomic<int64_t> backward_version{0};  // bumped (under mu) whenever backward_stacks change
  std::atomic<bool> paused{false};  // while Python books a step (its own tensor ops are not the job's)
  std::atomic<int64_t> key_epoch{0};  // bumped when key_ids is cleared: thread caches forget theirs
  std::atomic<int64_t> incarnation{0};  // bumped per meter: hooks and tables of an earlier meter are stale
};

constexpr int kSlots = 8;
constexpr size_t kMaxKeys = 100000;  // distinct keys remembered across drains

Slot& slot(int64_t i);

// ---- keys.cpp ---------------------------------------------------------------------------------
// The op description for a call, by the schema's name and overload (RecordFunction's and the
// dispatcher's pointers are the schema's own); cached per thread; never null: named ranges get a
// non-op.
OpInfo* op_info(const char* name, const char* overload);
// Append argument ``i`` of ``info`` to ``key``: its default flag and its tagged value.
// ``per_drain`` is set when the key references this drain's device-value copies.
void encode_input(Slot& s, ThreadTable& table, const OpInfo& info, size_t i, const c10::IValue& v,
                  KeyBuffer& key, int extra, bool& per_drain);
void encode_output(Slot& s, ThreadTable& table, const c10::IValue& v, KeyBuffer& key, int extra,
                   bool& per_drain);
std::vector<std::pair<std::string, std::string>> op_names(int64_t start);
std::vector<std::string> strings(int64_t start);
void set_op_classes(int64_t start, const std::vector<int64_t>& classes);

// ---- hooks.cpp --------------------------------------------------------------------------------
// The innermost backward module of graph task ``task``, or -1; s.mu held.
int64_t innermost_backward_locked(const Slot& s, int64_t task);
int64_t set_context(int64_t index, int64_t context, bool optimizer);

// ---- observer.cpp -----------------------------------------------------------------------------
int64_t enable(bool strict, bool by_key);
void disable(int64_t index, bool keep_key);
bool captures_by_key(int64_t index);
bool key_included_here();
void release(int64_t index);
py::tuple drain(int64_t index);
void set_planned(int64_t index, const std::vector<int64_t>& ids, bool planned);
void set_paused(int64_t index, bool paused);
void mark_pending_boundary(int64_t index, bool pending);
std::string take_violation(int64_t index);
void floor_enable(bool inputs = true, bool outputs = true);
void floor_disable();
void dispatch_floor_enable(bool enabled);

// ---- bindings.cpp: the hooks' Python interface (defined in hooks.cpp) -------------------------
void backward_event(int64_t index, int64_t module, bool enter);
bool add_module_hook(int64_t index, const at::Tensor& tensor, int64_t module, bool enter);
int64_t module_call(int64_t index, int64_t context, bool optimizer, int64_t module, py::handle value, bool enter);
int64_t backward_module(int64_t index, int64_t task);
void set_module_name(int64_t index, int64_t module, const std::string& name, bool root);
void clear_backward_modules(int64_t index);
void bind_module_fast_path(py::module_& m);  // ModuleFastPath: the module hooks' common case

}  // namespace flopcount_native
