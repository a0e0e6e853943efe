// The CPU backend's batch plan: its chunk and partition sizes for a call
// (see make_batch_plan), also for the tests that check which split a shape gets.
#pragma once

#include "../plan.h"

namespace torchext {
namespace cpu {

// training: the backward's plan; else the forward's.
BatchPlan cpu_batch_plan(const Dims& dims, Plan plan, bool training);

}  // namespace cpu
}  // namespace torchext
