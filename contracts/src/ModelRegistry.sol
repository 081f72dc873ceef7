// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {Clones} from "@openzeppelin/contracts/proxy/Clones.sol";
import {Strings} from "@openzeppelin/contracts/utils/Strings.sol";
import {IModelRegistry} from "./interfaces/IModelRegistry.sol";
import {IShareToken} from "./interfaces/IShareToken.sol";

/// @title ModelRegistry
/// @notice Researchers propose models with fixed terms; each model gets an id and its own ShareToken clone.
/// Terms can be amended by the proposer until training starts, and are immutable afterwards.
contract ModelRegistry is AccessControl, IModelRegistry {
    /// @notice Terms of a model (everything fixed once training starts).
    struct Terms {
        bytes32 specHash; // keccak256 of the canonical model spec
        string metadataURI; // where the human-readable description lives
        uint16 numStages; // pipeline stages
        bytes32 accountingHash; // hash of the accounting function (version pinned off-chain)
        uint64 epochLength; // epoch length, in the unit of the accounting function (interpreted off-chain)
        uint64 challengeWindow; // seconds after an epoch root's submission during which it can be challenged
        uint16 auditRateBps; // spot-check rate in basis points
        uint256 inferenceFeeWei; // minimum inference fee per request
    }

    /// @notice A registered model.
    struct Model {
        address proposer;
        Status status;
        uint64 trainingStartedAt;
        address shareToken;
        Terms terms;
    }

    /// @notice Longest challenge window (365 days). The ledger computes submittedAt + challengeWindow in uint64;
    /// with block timestamps below 2^40 for the next 30,000 years the sum can never overflow, and a window that
    /// long is already beyond any unbonding delay a node registry accepts (NodeRegistry.MAX_UNBONDING_DELAY).
    uint64 public constant MAX_CHALLENGE_WINDOW = 365 days;
    /// @notice Largest inference fee: ShareToken accepts at most 2^128 - 1 wei of deposits in its lifetime, so a
    /// larger fee could never be paid.
    uint256 public constant MAX_INFERENCE_FEE_WEI = type(uint128).max;
    /// @notice Longest metadata URI in bytes: keeps getModel cheap to read for every client.
    uint256 public constant MAX_METADATA_URI_BYTES = 2048;

    /// @notice ShareToken implementation that every model's token clones.
    address public immutable shareTokenImplementation;

    /// @notice The ContributionLedger (the only minter of share tokens); set once.
    address public ledger;

    /// @notice Number of models proposed; ids run 1..modelCount.
    uint256 public modelCount;

    mapping(uint256 modelId => Model) private _models;

    /// @notice The model id does not exist.
    error ModelRegistryUnknownModel(uint256 modelId);
    /// @notice A term is out of range.
    /// @param term The term's name in Terms.
    /// @param value The value given (a bytes32 as a number; a string by its length in bytes).
    /// @param min The smallest value accepted.
    /// @param max The largest value accepted.
    error ModelRegistryInvalidTerm(string term, uint256 value, uint256 min, uint256 max);
    /// @notice The caller is not the model's proposer.
    error ModelRegistryNotProposer(uint256 modelId, address caller);
    /// @notice The model is not in the status the call needs.
    error ModelRegistryWrongStatus(uint256 modelId, Status status);
    /// @notice The ledger is already set.
    error ModelRegistryLedgerAlreadySet(address ledger);
    /// @notice The ledger address is zero.
    error ModelRegistryInvalidLedger();
    /// @notice Models cannot be proposed before the ledger is set.
    error ModelRegistryLedgerNotSet();

    /// @notice A model was proposed.
    event ModelProposed(uint256 indexed modelId, address indexed proposer, bytes32 specHash, address shareToken);
    /// @notice A proposed model's terms were amended.
    event ModelTermsAmended(uint256 indexed modelId, bytes32 specHash);
    /// @notice Training started; the terms are now immutable.
    event TrainingStarted(uint256 indexed modelId, uint64 startedAt);
    /// @notice A model was retired.
    event ModelRetired(uint256 indexed modelId);
    /// @notice The ledger was set.
    event LedgerSet(address ledger);

    /// @param admin Holder of DEFAULT_ADMIN_ROLE (can set the ledger once).
    /// @param shareTokenImplementation_ The ShareToken implementation to clone.
    constructor(address admin, address shareTokenImplementation_) {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        shareTokenImplementation = shareTokenImplementation_;
    }

    /// @notice Sets the ContributionLedger once; admin only.
    /// @param ledger_ The ledger address (non-zero).
    function setLedger(address ledger_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (ledger != address(0)) revert ModelRegistryLedgerAlreadySet(ledger);
        if (ledger_ == address(0)) revert ModelRegistryInvalidLedger();
        ledger = ledger_;
        emit LedgerSet(ledger_);
    }

    /// @notice Proposes a model and deploys its ShareToken clone.
    /// @param terms The model's terms.
    /// @return modelId The new model id.
    function propose(Terms calldata terms) external returns (uint256 modelId) {
        if (ledger == address(0)) revert ModelRegistryLedgerNotSet();
        _checkTerms(terms);
        modelId = ++modelCount;
        address token = Clones.clone(shareTokenImplementation);
        string memory id = Strings.toString(modelId);
        IShareToken(token).initialize(
            string.concat("PMN Model ", id, " Share"),
            string.concat("PMS", id),
            modelId,
            ledger
        );
        Model storage m = _models[modelId];
        m.proposer = msg.sender;
        m.status = Status.Proposed;
        m.shareToken = token;
        m.terms = terms;
        emit ModelProposed(modelId, msg.sender, terms.specHash, token);
    }

    /// @notice Replaces the terms of a model that has not started training; proposer only.
    /// @param modelId The model.
    /// @param terms The new terms.
    function amendTerms(uint256 modelId, Terms calldata terms) external {
        Model storage m = _proposerModel(modelId);
        if (m.status != Status.Proposed) revert ModelRegistryWrongStatus(modelId, m.status);
        _checkTerms(terms);
        m.terms = terms;
        emit ModelTermsAmended(modelId, terms.specHash);
    }

    /// @notice Starts training; freezes the terms; proposer only.
    /// @param modelId The model.
    function startTraining(uint256 modelId) external {
        Model storage m = _proposerModel(modelId);
        if (m.status != Status.Proposed) revert ModelRegistryWrongStatus(modelId, m.status);
        m.status = Status.Training;
        m.trainingStartedAt = uint64(block.timestamp);
        emit TrainingStarted(modelId, uint64(block.timestamp));
    }

    /// @notice Retires a model: no further epoch roots; existing roots stay claimable; proposer only.
    /// @param modelId The model.
    function retire(uint256 modelId) external {
        Model storage m = _proposerModel(modelId);
        if (m.status == Status.Retired) revert ModelRegistryWrongStatus(modelId, m.status);
        m.status = Status.Retired;
        emit ModelRetired(modelId);
    }

    /// @notice The full record of a model.
    /// @param modelId The model.
    function getModel(uint256 modelId) external view returns (Model memory) {
        return _existing(modelId);
    }

    /// @inheritdoc IModelRegistry
    function statusOf(uint256 modelId) external view returns (Status) {
        return _models[modelId].status;
    }

    /// @inheritdoc IModelRegistry
    function challengeWindowOf(uint256 modelId) external view returns (uint64) {
        return _existing(modelId).terms.challengeWindow;
    }

    /// @inheritdoc IModelRegistry
    function shareTokenOf(uint256 modelId) external view returns (address) {
        return _existing(modelId).shareToken;
    }

    /// @inheritdoc IModelRegistry
    function numStagesOf(uint256 modelId) external view returns (uint16) {
        return _existing(modelId).terms.numStages;
    }

    function _existing(uint256 modelId) private view returns (Model storage m) {
        m = _models[modelId];
        if (m.status == Status.None) revert ModelRegistryUnknownModel(modelId);
    }

    function _proposerModel(uint256 modelId) private view returns (Model storage m) {
        m = _existing(modelId);
        if (m.proposer != msg.sender) revert ModelRegistryNotProposer(modelId, msg.sender);
    }

    /// @dev Bounds of every term, and why. The chain does arithmetic only on challengeWindow (ledger: submittedAt +
    /// window, bounded above); the others are read off chain, and are bounded by their type or by what the
    /// contracts can honour.
    function _checkTerms(Terms calldata t) private pure {
        // commitments: zero means "unset"
        _bound("specHash", uint256(t.specHash), 1, type(uint256).max);
        _bound("accountingHash", uint256(t.accountingHash), 1, type(uint256).max);
        _bound("metadataURI", bytes(t.metadataURI).length, 1, MAX_METADATA_URI_BYTES);
        // at least one stage; the pipeline layout is off chain, so the type is the bound
        _bound("numStages", t.numStages, 1, type(uint16).max);
        // an epoch of zero units never ends; interpreted off chain, so the type is the bound
        _bound("epochLength", t.epochLength, 1, type(uint64).max);
        // a window of zero cannot be challenged; see MAX_CHALLENGE_WINDOW
        _bound("challengeWindow", t.challengeWindow, 1, MAX_CHALLENGE_WINDOW);
        // a rate, in basis points
        _bound("auditRateBps", t.auditRateBps, 0, 10_000);
        // see MAX_INFERENCE_FEE_WEI
        _bound("inferenceFeeWei", t.inferenceFeeWei, 0, MAX_INFERENCE_FEE_WEI);
    }

    function _bound(string memory term, uint256 value, uint256 min, uint256 max) private pure {
        if (value < min || value > max) revert ModelRegistryInvalidTerm(term, value, min, max);
    }
}
