#include "runtime/stream.h"


#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "runtime/error.h"
#include "runtime/threads.h"

#ifdef TROUPE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace troupe::runtime {

struct stream::impl {
  // cpu
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  bool busy = false;
  bool stop = false;
  std::exception_ptr failure;
  std::thread worker;
#ifdef TROUPE_HAVE_CUDA
  cudaStream_t cuda = nullptr;
#endif

  void run() {
    adopt_num_threads();  // tasks run kernels: the process's thread setting (threads.h invariant 3)
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      cv.wait(lock, [&] { return stop || !queue.empty(); });
      if (queue.empty() && stop) return;
      auto task = std::move(queue.front());
      queue.pop_front();
      busy = true;
      lock.unlock();
      try {
        task();
      } catch (...) {
        std::lock_guard<std::mutex> g(mu);
        if (!failure) failure = std::current_exception();
      }
      lock.lock();
      busy = false;
      cv.notify_all();
    }
  }
};

stream::stream(device dev) : dev_(dev), impl_(std::make_unique<impl>()) {
  if (dev.is_cpu()) {
    impl_->worker = std::thread([p = impl_.get()] { p->run(); });
  } else {
#ifdef TROUPE_HAVE_CUDA
    cudaSetDevice(dev.index);
    cudaError_t e = cudaStreamCreateWithFlags(&impl_->cuda, cudaStreamNonBlocking);
    TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cudaStreamCreate on {}: {}", dev.str(), cudaGetErrorString(e));
#else
    TROUPE_THROW(errc::unsupported, "stream on {}: this build has no CUDA", dev.str());
#endif
  }
}

stream::~stream() {
  if (dev_.is_cpu()) {
    {
      std::lock_guard<std::mutex> g(impl_->mu);
      impl_->stop = true;
    }
    impl_->cv.notify_all();
    if (impl_->worker.joinable()) impl_->worker.join();
  } else {
#ifdef TROUPE_HAVE_CUDA
    if (impl_->cuda) cudaStreamDestroy(impl_->cuda);
#endif
  }
}

#ifdef TROUPE_HAVE_CUDA
namespace {
void CUDART_CB run_host_task(void* data) {
  std::unique_ptr<std::function<void()>> task(static_cast<std::function<void()>*>(data));
  (*task)();
}
}  // namespace
#endif

void stream::enqueue(std::function<void()> task) {
  if (dev_.is_cpu()) {
    {
      std::lock_guard<std::mutex> g(impl_->mu);
      impl_->queue.push_back(std::move(task));
    }
    impl_->cv.notify_all();
    return;
  }
#ifdef TROUPE_HAVE_CUDA
  // An exception must not escape the CUDA callback (std::terminate): keep it for synchronize().
  auto* heap = new std::function<void()>([task = std::move(task), p = impl_.get()] {
    try {
      task();
    } catch (...) {
      std::lock_guard<std::mutex> g(p->mu);
      if (!p->failure) p->failure = std::current_exception();
    }
  });
  cudaError_t e = cudaLaunchHostFunc(impl_->cuda, run_host_task, heap);
  if (e != cudaSuccess) {
    delete heap;
    TROUPE_THROW(errc::cuda, "cudaLaunchHostFunc on {}: {}", dev_.str(), cudaGetErrorString(e));
  }
#endif
}

void stream::synchronize() {
  if (dev_.is_cpu()) {
    std::unique_lock<std::mutex> lock(impl_->mu);
    impl_->cv.wait(lock, [&] { return impl_->queue.empty() && !impl_->busy; });
    if (impl_->failure) {
      auto f = impl_->failure;
      impl_->failure = nullptr;
      std::rethrow_exception(f);
    }
    return;
  }
#ifdef TROUPE_HAVE_CUDA
  cudaError_t e = cudaStreamSynchronize(impl_->cuda);
  TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cudaStreamSynchronize on {}: {}", dev_.str(), cudaGetErrorString(e));
  std::exception_ptr f;
  {
    std::lock_guard<std::mutex> g(impl_->mu);
    std::swap(f, impl_->failure);
  }
  if (f) std::rethrow_exception(f);
#endif
}

void* stream::native_handle() const {
#ifdef TROUPE_HAVE_CUDA
  return impl_->cuda;
#else
  return nullptr;
#endif
}

// ---- event -------------------------------------------------------------------

struct event::impl {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0;   // generation of the last record()
  uint64_t completed = 0;  // generation that has completed
#ifdef TROUPE_HAVE_CUDA
  cudaEvent_t cuda = nullptr;
  ~impl() {
    if (cuda) cudaEventDestroy(cuda);
  }
#endif
};

event::event() : impl_(std::make_shared<impl>()) {}
event::~event() = default;

void event::record(stream& s) {
  if (s.dev().is_cpu()) {
    uint64_t gen;
    {
      std::lock_guard<std::mutex> g(impl_->mu);
      gen = ++impl_->recorded;
    }
    auto state = impl_;
    s.enqueue([state, gen] {
      std::lock_guard<std::mutex> g(state->mu);
      if (state->completed < gen) state->completed = gen;
      state->cv.notify_all();
    });
    return;
  }
#ifdef TROUPE_HAVE_CUDA
  if (!impl_->cuda) cudaEventCreateWithFlags(&impl_->cuda, cudaEventDisableTiming);
  cudaError_t e = cudaEventRecord(impl_->cuda, static_cast<cudaStream_t>(s.native_handle()));
  TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cudaEventRecord: {}", cudaGetErrorString(e));
  impl_->recorded = 1;
#endif
}

void event::synchronize() {
#ifdef TROUPE_HAVE_CUDA
  if (impl_->cuda) {
    cudaError_t e = cudaEventSynchronize(impl_->cuda);
    TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cudaEventSynchronize: {}", cudaGetErrorString(e));
    return;
  }
#endif
  std::unique_lock<std::mutex> lock(impl_->mu);
  uint64_t target = impl_->recorded;
  impl_->cv.wait(lock, [&] { return impl_->completed >= target; });
}

bool event::query() const {
#ifdef TROUPE_HAVE_CUDA
  if (impl_->cuda) return cudaEventQuery(impl_->cuda) == cudaSuccess;
#endif
  std::lock_guard<std::mutex> g(impl_->mu);
  return impl_->completed >= impl_->recorded;
}

void event::block(stream& s) {
  if (s.dev().is_cpu()) {
    auto state = impl_;
    uint64_t target;
    {
      std::lock_guard<std::mutex> g(impl_->mu);
      target = impl_->recorded;
    }
#ifdef TROUPE_HAVE_CUDA
    if (impl_->cuda) {
      cudaEvent_t ev = impl_->cuda;
      s.enqueue([ev, state] { cudaEventSynchronize(ev); });
      return;
    }
#endif
    s.enqueue([state, target] {
      std::unique_lock<std::mutex> lock(state->mu);
      state->cv.wait(lock, [&] { return state->completed >= target; });
    });
    return;
  }
#ifdef TROUPE_HAVE_CUDA
  if (impl_->cuda) {
    cudaError_t e = cudaStreamWaitEvent(static_cast<cudaStream_t>(s.native_handle()), impl_->cuda, 0);
    TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cudaStreamWaitEvent: {}", cudaGetErrorString(e));
  } else {
    auto state = impl_;
    uint64_t target = impl_->recorded;
    s.enqueue([state, target] {
      std::unique_lock<std::mutex> lock(state->mu);
      state->cv.wait(lock, [&] { return state->completed >= target; });
    });
  }
#endif
}

}  // namespace troupe::runtime
