// (being written: the sampling CPU kernel)
namespace fmkernels::cpu {}
