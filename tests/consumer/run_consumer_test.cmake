# ctest driver of the consumer test (cmake -P): installs the fused_convt build tree into a scratch prefix,
# then configures, builds and runs tests/consumer against that prefix, with the generator, compiler and
# CUDA settings of the main build.
#
#   required: -DBINARY_DIR=<fused_convt build tree> -DCONSUMER_SOURCE_DIR=<tests/consumer>
#             -DWORK_DIR=<scratch folder, emptied first> -DGENERATOR=<name> -DCXX_COMPILER=<path>
#   optional: -DCONFIG=<configuration> -DGENERATOR_PLATFORM -DGENERATOR_TOOLSET
#             -DCUDA_ARCHITECTURES=<comma-separated> -DCUDA_TOOLKIT_ROOT=<path>
foreach(required BINARY_DIR CONSUMER_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if("${${required}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer_test.cmake: -D${required}=... is required")
  endif()
endforeach()

function(run_step name)
  message(STATUS "consumer test: ${name}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "consumer test: ${name} failed (${status})")
  endif()
endfunction()

set(prefix ${WORK_DIR}/prefix)
set(consumer_build ${WORK_DIR}/build)
set(config_args)
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()
file(REMOVE_RECURSE ${WORK_DIR})

run_step(install ${CMAKE_COMMAND} --install ${BINARY_DIR} --prefix ${prefix} ${config_args})

# Settings go through an initial-cache script: list values (CUDA architectures) survive it intact.
string(REPLACE "," ";" cuda_architectures "${CUDA_ARCHITECTURES}")
set(initial_cache ${WORK_DIR}/initial_cache.cmake)
file(WRITE ${initial_cache}
  "set(CMAKE_PREFIX_PATH [[${prefix}]] CACHE PATH \"\")\n"
  "set(CMAKE_CXX_COMPILER [[${CXX_COMPILER}]] CACHE FILEPATH \"\")\n"
  "set(CMAKE_BUILD_TYPE [[${CONFIG}]] CACHE STRING \"\")\n")
if(cuda_architectures)
  file(APPEND ${initial_cache} "set(CMAKE_CUDA_ARCHITECTURES [[${cuda_architectures}]] CACHE STRING \"\")\n")
endif()
if(CUDA_TOOLKIT_ROOT)
  file(APPEND ${initial_cache} "set(CUDAToolkit_ROOT [[${CUDA_TOOLKIT_ROOT}]] CACHE PATH \"\")\n")
endif()
set(generator_args -G ${GENERATOR})
if(GENERATOR_PLATFORM)
  list(APPEND generator_args -A ${GENERATOR_PLATFORM})
endif()
if(GENERATOR_TOOLSET)
  list(APPEND generator_args -T ${GENERATOR_TOOLSET})
endif()
run_step(configure ${CMAKE_COMMAND} -C ${initial_cache} ${generator_args}
         -S ${CONSUMER_SOURCE_DIR} -B ${consumer_build})

# The package must come from the scratch prefix, not from another installation on the machine.
file(STRINGS ${consumer_build}/CMakeCache.txt found_dir REGEX "^fused_convt_DIR:")
string(REGEX REPLACE "^[^=]*=" "" found_dir "${found_dir}")
file(REAL_PATH "${found_dir}" found_dir)
file(REAL_PATH "${prefix}" real_prefix)
string(FIND "${found_dir}" "${real_prefix}/" position)
if(NOT position EQUAL 0)
  message(FATAL_ERROR "consumer test: fused_convt was found in ${found_dir}, not under ${real_prefix}")
endif()

run_step(build ${CMAKE_COMMAND} --build ${consumer_build} ${config_args})

# Multi-config generators put the executable in a per-configuration folder.
set(app_name consumer_app)
if(CMAKE_HOST_WIN32)
  string(APPEND app_name .exe)
endif()
set(app ${consumer_build}/${CONFIG}/${app_name})
if(NOT CONFIG OR NOT EXISTS ${app})
  set(app ${consumer_build}/${app_name})
endif()
run_step(run ${app})
